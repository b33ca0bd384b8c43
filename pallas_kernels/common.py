"""Helpers shared by the Pallas kernels: padding, chunking, the parallel-over-chunks WY preparation of the delta rule
(plain XLA, the reference of the WY kernels), and small kernel-body helpers (lazy Pallas import, Triton params, dots).

Imports only jax/numpy (layer rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def pallas_module():
    """jax.experimental.pallas, imported lazily (importing Pallas is slow)."""
    from jax.experimental import pallas as pl

    return pl


def triton_params(num_warps: int, num_stages: int):
    """Triton compiler params on GPU (selects the Triton lowering, which Mosaic GPU cannot replace here yet); None
    elsewhere (interpret mode, TPU)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.pallas import triton as plgpu_triton
    except ImportError:  # pragma: no cover - depends on the installed jax
        return None
    return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot(a, b, dtype):
    """a @ b with operands in the compute dtype and float32 accumulation (2-D operands inside a kernel body)."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (0,)), ((), ())), preferred_element_type=F32)


def dot_tn(a, b, dtype):
    """a^T @ b."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((0,), (0,)), ((), ())), preferred_element_type=F32)


def dot_nt(a, b, dtype):
    """a @ b^T."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())), preferred_element_type=F32)


def check_rank(name: str, x, rank: int) -> None:
    """Raise a clear error when tensor `name` does not have `rank` dimensions."""
    if x.ndim != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")


def pad_time(x, multiple: int, value=0):
    """Pad axis 1 (time) of `x` up to a multiple of `multiple` with `value`. Returns (padded, original_length)."""
    t = x.shape[1]
    extra = (-t) % multiple
    if extra == 0:
        return x, t
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value), t


def chunk_cumsum(g, chunk: int):
    """Cumulative sum of the log-decay inside each chunk (inclusive), float32.

    g: [B, T, H] with T a multiple of `chunk`. Returns [B, H, T] (time last, contiguous for the kernel's per-head loads).
    """
    b, t, h = g.shape
    gc = jnp.cumsum(g.astype(jnp.float32).reshape(b, t // chunk, chunk, h), axis=2)
    return gc.reshape(b, t, h).transpose(0, 2, 1)


def wy_factors(k, v, beta, gc, chunk: int):
    """WY factors of every chunk, computed in parallel over chunks (float32 math, cast back to k's/v's dtype).

    Inside a chunk with start state S0 the corrected values are u' = U - W S0, where (with gamma_i = exp(gc_i))
      (I + A) W = diag(beta * gamma) K,   (I + A) U = diag(beta) V,   A_ij = beta_i (gamma_i / gamma_j) k_i.k_j (i > j).
    k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], gc: [B, H, T] (chunk-local cumsum) or None (no decay).
    T must be a multiple of `chunk`. Returns w: [B, T, H, K] (k.dtype), u: [B, T, H, V] (v.dtype).
    """
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    n = t // chunk
    f32 = jnp.float32
    kc = k.astype(f32).reshape(b, n, chunk, h, dk).transpose(0, 1, 3, 2, 4)  # [B, N, H, C, K]
    vc = v.astype(f32).reshape(b, n, chunk, h, dv).transpose(0, 1, 3, 2, 4)
    bc = beta.astype(f32).reshape(b, n, chunk, h).transpose(0, 1, 3, 2)[..., None]  # [B, N, H, C, 1]
    strict = jnp.tril(jnp.ones((chunk, chunk), dtype=bool), k=-1)
    a = jnp.einsum("bnhik,bnhjk->bnhij", kc * bc, kc)
    if gc is not None:
        gcc = gc.reshape(b, h, n, chunk).transpose(0, 2, 1, 3)  # [B, N, H, C]
        diff = gcc[..., :, None] - gcc[..., None, :]
        # Mask before exp: above the diagonal the difference is positive and could overflow.
        a = a * jnp.exp(jnp.where(strict, diff, 0.0))
        kw = kc * (bc * jnp.exp(gcc)[..., None])
    else:
        kw = kc * bc
    a = jnp.where(strict, a, 0.0) + jnp.eye(chunk, dtype=f32)
    rhs = jnp.concatenate([kw, vc * bc], axis=-1)
    sol = jax.lax.linalg.triangular_solve(a, rhs, left_side=True, lower=True, unit_diagonal=True)
    w = sol[..., :dk].transpose(0, 1, 3, 2, 4).reshape(b, t, h, dk)
    u = sol[..., dk:].transpose(0, 1, 3, 2, 4).reshape(b, t, h, dv)
    return w.astype(k.dtype), u.astype(v.dtype)
