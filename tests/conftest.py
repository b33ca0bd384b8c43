"""Shared test setup: float32 matmuls at full precision on CPU, and markers for GPU/TPU-only tests."""

import atexit
import os
import shutil
import tempfile

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

# A compilation cache for this session only (a fresh directory, removed at exit: no run depends on an earlier one).
# Tests compile the same computation again and again where jit's own cache cannot see it: eager calls of scanned ops
# re-trace and recompile their bodies, and fresh jit closures over the same shapes compile anew. The key is the
# lowered program with its compile options, so a hit is the same executable (tests/models: 177 -> 147 s on 2 cores).
# Left alone where the user configured a cache.
if not jax.config.jax_compilation_cache_dir:
    _cache_dir = tempfile.mkdtemp(prefix="ahn_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the repeats are many small compiles
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
