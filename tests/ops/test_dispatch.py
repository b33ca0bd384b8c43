import pytest

from ahn_jax.ops import dispatch


def test_explicit_impl_that_cannot_run_raises():
    dispatch.register("_demo", "ref", "math:sqrt", {"cpu": 0, "gpu": 0, "tpu": 0})
    dispatch.register("_demo", "fast", "math:floor", {"gpu": 10})
    assert dispatch.resolve("_demo", "auto", backend="cpu").__name__ == "sqrt"
    assert dispatch.resolve("_demo", "auto", backend="gpu").__name__ == "floor"
    with pytest.raises(RuntimeError, match="cannot run on backend 'cpu'"):
        dispatch.resolve("_demo", "fast", backend="cpu")
    with pytest.raises(ValueError, match="unknown impl"):
        dispatch.resolve("_demo", "nope", backend="cpu")
