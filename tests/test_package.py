"""The package imports without training-only dependencies and keeps its layer rules."""

import ast
import pathlib

import ahn_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_version():
    assert ahn_jax.__version__


def test_lower_layers_never_import_higher_ones():
    rules = {
        "ahn_jax/ops": ("ahn_jax.models", "ahn_jax.training", "ahn_jax.data", "ahn_jax.hf", "ahn_jax.inference",
                        "flax", "torch", "grain", "ml_collections", "tensorflow"),
        "pallas_kernels": ("ahn_jax", "flax", "torch", "grain", "ml_collections", "tensorflow"),
        "ahn_jax/models": ("ahn_jax.training", "ahn_jax.data", "grain", "ml_collections", "tensorflow_datasets",
                           "tensorflow", "torch"),
        "ahn_jax/hf": ("torch", "ahn_jax.training", "ahn_jax.data"),
    }
    bad = []
    for folder, forbidden in rules.items():
        for path in (ROOT / folder).rglob("*.py"):
            for mod in _imports(path):
                if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_version_branches_only_in_compat():
    bad = []
    for path in list((ROOT / "ahn_jax").rglob("*.py")) + list((ROOT / "pallas_kernels").rglob("*.py")):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        if "jax.__version__" in text or "jax._src" in text:
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, bad
