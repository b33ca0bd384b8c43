"""Helpers the benchmark scripts share (they run as `python3 benchmarks/<script>.py`, so this directory is on
sys.path): relative error for the agreement checks, the wall-clock timing of a jitted call, and the jitted
forward+backward that the timings use."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def rel(a, b) -> float:
    """Relative Frobenius error |a - b| / |b|, computed in float64."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def time_jax(fn, *args, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of `reps` calls of fn(*args), each waited for, after `warmup` untimed calls (compile)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def forward_backward(loss, argnums):
    """Forward+backward of a scalar loss, jitted: computes the loss AND its gradients, returns the gradients.

    jax.jit(jax.grad(loss)) is not a forward+backward: the loss value is discarded, so XLA drops every op that only
    the primal output needs. For a custom_vjp whose residuals are its inputs (pallas_kernels.delta_rule) that is the
    whole forward (the WY and forward kernels), and the timing would be of the backward alone, against libraries whose
    forward+backward (torch's `o.backward()`) runs both. Returning the value from the jitted function keeps it.
    """
    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums))
    return lambda *args: value_and_grads(*args)[1]
