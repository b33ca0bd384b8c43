"""colab/*.ipynb: a fast structural check of every notebook, and each one executed on CPU with its tiny settings
(nbclient, in a fresh kernel). The notebooks carry their own asserts (student == teacher before the window, constant
cache, kernel vs reference errors, one metrics line per step), so a run that finishes is a run whose checks passed."""

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = {"quickstart", "train_tiny", "kernels"}


def _read(path):
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    return nb


def test_the_three_notebooks_exist():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = _read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(code):
        assert not cell.outputs and cell.execution_count is None, f"{path.name}: code cell {i} has stored outputs"
        ast.parse(cell.source, filename=f"{path.name}[cell {i}]")  # plain Python: no shell magics to break CI
    sources = [c.source for c in code]
    # Backend detection comes before any sized work, and the sizes follow from it.
    detect = next(i for i, s in enumerate(sources) if "jax.default_backend()" in s)
    assert "TINY" in sources[detect]
    assert all("TINY" not in s and "NATIVE" not in s for s in sources[:detect])
    assert any("AHN_JAX_REPO" in s and "pip" in s for s in sources[:detect]), "missing the install/setup cell"
    assert path.stat().st_size < 30_000, f"{path.name} is {path.stat().st_size} bytes: outputs or data stored?"


def _execute(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: CPU only, one device (not the test suite's 8 fake ones), tiny sizes.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("AHN_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("AHN_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.delenv("AHN_QWEN_PATH", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _read(path)
    # Run from colab/, as a user would: the setup cell must find the checkout among the parents.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "colab")}}).execute()
    return nb


def _stdout(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_quickstart_runs_on_cpu(tmp_path, monkeypatch):
    out = _stdout(_execute(ROOT / "colab" / "quickstart.ipynb", tmp_path, monkeypatch))
    assert "backend=cpu" in out and "tiny=True" in out
    assert "KL(teacher || student)" in out and "full KV cache" in out


def test_train_tiny_runs_on_cpu(tmp_path, monkeypatch):
    out = _stdout(_execute(ROOT / "colab" / "train_tiny.ipynb", tmp_path, monkeypatch))
    assert (tmp_path / "workdir" / "metrics.jsonl").exists()
    assert (tmp_path / "workdir" / "loss.png").stat().st_size > 0
    assert "beyond-window acc" in out


@pytest.mark.slow  # 21 s; its kernel-vs-reference checks are the fast suite's tests/pallas_kernels (structure: above)
def test_kernels_runs_on_cpu(tmp_path, monkeypatch):
    out = _stdout(_execute(ROOT / "colab" / "kernels.ipynb", tmp_path, monkeypatch))
    assert "interpret=True" in out
    assert "gated_delta_rule" in out and "swa_attention" in out
