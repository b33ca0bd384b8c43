"""Shared test setup: float32 matmuls at full precision on CPU, and markers for GPU/TPU-only tests."""

import os

# Fake devices for sharding tests must be requested before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One OpenBLAS thread, read when the library loads (so set here, before jax/scipy load it; subprocesses and notebook
# kernels inherit it). XLA's CPU triangular_solve calls LAPACK (scipy's OpenBLAS): with OpenBLAS's own threads beside
# XLA's on a 2-core runner one small batched solve took ~340 ms instead of ~0.7 ms, and the chunked delta rule does
# one per chunk.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
