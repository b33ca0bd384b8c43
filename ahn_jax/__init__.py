"""ahn_jax: sliding window + sinks + a learned memory (AHN, AllMem) for pretrained Qwen models, in JAX/Flax.

Public API (imported lazily so that `import ahn_jax` stays cheap and never pulls training-only dependencies):

- `load_pretrained(path, *, dtype="bfloat16", ahn=None, ahn_weights=None)` -> model
- `AHNConfig(...)`: which memory, window, sinks, layers, dims, chunk sizes, impls
- `generate(...)`: text generation with a constant-size cache
- `ahn_jax.ops`: gated_delta_rule, delta_rule, ssd, ttt_mlp, attention
"""

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": ("ahn_jax.models.loading", "load_pretrained"),
    "AHNConfig": ("ahn_jax.models.hybrid_config", "AHNConfig"),
    "generate": ("ahn_jax.inference.generation", "generate"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ahn_jax' has no attribute {name!r}")


__all__ = ["load_pretrained", "AHNConfig", "generate", "__version__"]
