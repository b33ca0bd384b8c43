"""Helpers shared by the Pallas kernels: padding, chunking, the parallel-over-chunks WY preparation of the delta rule
(plain XLA, the reference of the WY kernels), and small kernel-body helpers (lazy Pallas import, Triton params, dots).

Imports only jax/numpy (layer rule).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def pallas_module():
    """jax.experimental.pallas, imported lazily (importing Pallas is slow)."""
    from jax.experimental import pallas as pl

    return pl


# Grid size up to which an extra Triton pipelining stage pays (~2 programs per SM on an H100's 132 SMs): more stages
# cost occupancy, which only matters when programs are many (delta_rule / ssd forward stages, benchmarks/RESULTS.md).
FEW_PROGRAMS = 256


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


def unit_lower_inverse(a, base: int = 16):
    """(I + A)^-1 for strictly lower-triangular A: [..., C, C] float32, matmuls only (no triangular_solve).

    Diagonal blocks of size <= `base` use the product form (I - N)(I + N^2)(I + N^4)... (exact since N^base = 0);
    larger matrices are halved recursively (both halves inverted as one batch) and joined by T21 = -T22 A21 T11,
    the blocked inversion that LAPACK's trtri also uses. HIGHEST precision: on GPU the default float32 dot is tf32,
    too coarse for the alternating sums of the product form when keys are correlated.
    """
    c = a.shape[-1]
    mm = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)
    if c <= base or c % 2:
        inv = jnp.eye(c, dtype=a.dtype) - a
        p = a
        for _ in range(max(0, (c - 1).bit_length() - 1)):  # N^2, N^4, ... up to N^(2^m) with 2^(m+1) >= c
            p = mm(p, p)
            inv = inv + mm(inv, p)
        return inv
    h = c // 2
    halves = unit_lower_inverse(jnp.stack([a[..., :h, :h], a[..., h:, h:]], axis=-3), base)
    t11, t22 = halves[..., 0, :, :], halves[..., 1, :, :]
    t21 = -mm(t22, mm(a[..., h:, :h], t11))
    top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([t21, t22], axis=-1)], axis=-2)


WY_VJP_INVERSES = ("blocked", "solve")


def wy_factors_and_vjp(k, v, beta, gc, chunk: int, inverse: str = "blocked"):
    """wy_factors plus an explicit, matmul-only VJP of it (batched float32 einsums over chunks, no jax.vjp).

    k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], gc: [B, H, T] float32 or None; T a multiple of `chunk`.
    T = (I + A)^-1 is formed once per chunk ("blocked": unit_lower_inverse; "solve": one triangular_solve against I)
    and reused for W = T KB, U = T VB and the VJP, where (KB = diag(beta gamma) K, VB = diag(beta) V, gamma = e^gc)
      dKB = T^T dW,  dVB = T^T dU,  dA = -strict_lower(dKB W^T + dVB U^T)    (W = T KB, U = T VB), then
      dk_i = (beta gamma)_i dKB_i + sum_j D_ij k_j + sum_j D_ji k_j,   D = dA * beta_i * Gamma_ij,
      dbeta_i = gamma_i dKB_i.k_i + dVB_i.v_i + sum_j dA_ij Gamma_ij k_i.k_j,   dv = beta dVB,
      dgc_i = beta_i gamma_i dKB_i.k_i + sum_j P_ij - sum_j P_ji,   P = dA * A   (dA_ij/dgc_i = A_ij = -dA_ij/dgc_j).
    Returns (w [B, T, H, K] in k.dtype, u [B, T, H, V] in v.dtype, vjp), vjp(dw, du) -> float32 (dk [B, T, H, K],
    dv [B, T, H, V], dbeta [B, T, H], dgc [B, H, T] or None).
    """
    if inverse not in WY_VJP_INVERSES:
        raise ValueError(f"inverse must be one of {WY_VJP_INVERSES}, got {inverse!r}")
    if k.shape[1] % chunk:
        raise ValueError(f"the time axis of k ({k.shape[1]}) must be a multiple of chunk={chunk}")
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    n = t // chunk
    # Head-major chunks [B, N, H, C, .]: (b, n, h) lead every product as batch dimensions and the chunk rows and
    # features are the two minor ones, so XLA runs each einsum as a batched gemm without a transposed copy of its
    # operands (in the token-major [B, N, C, H, .] layout it made 16 transposes, 2.45 of 12.7 ms of the gated rule's
    # fwd+bwd on the H100). Only the inputs and outputs change layout, once each.
    def heads(x, width):
        return x.astype(F32).reshape(b, n, chunk, h, width).transpose(0, 1, 3, 2, 4)

    def tokens(x):
        return x.transpose(0, 1, 3, 2, 4).reshape(b, t, h, x.shape[-1])

    kh, vh = heads(k, dk), heads(v, dv)
    bh = beta.astype(F32).reshape(b, n, chunk, h).transpose(0, 1, 3, 2)  # [B, N, H, C]
    strict = jnp.tril(jnp.ones((chunk, chunk), dtype=bool), k=-1)
    kk = jnp.einsum("bnhik,bnhjk->bnhij", kh, kh)
    if gc is not None:
        gh = gc.reshape(b, h, n, chunk).transpose(0, 2, 1, 3)  # [B, N, H, C]
        # Mask before exp: above the diagonal the difference is positive and could overflow.
        gamma_mat = jnp.where(strict, jnp.exp(jnp.where(strict, gh[..., :, None] - gh[..., None, :], 0.0)), 0.0)
        gamma_vec = jnp.exp(gh)
    else:
        gamma_mat = strict.astype(F32)
        gamma_vec = jnp.ones_like(bh)
    beta_rows = bh[..., :, None]  # [B, N, H, C, 1]
    a = beta_rows * kk * gamma_mat
    if inverse == "blocked":
        tinv = unit_lower_inverse(a)
    else:
        eye = jnp.broadcast_to(jnp.eye(chunk, dtype=F32), a.shape)
        tinv = lax.linalg.triangular_solve(a + eye, eye, left_side=True, lower=True, unit_diagonal=True)
    kscale = bh * gamma_vec  # [B, N, H, C]
    kb = kh * kscale[..., None]
    vb = vh * bh[..., None]
    w32 = jnp.einsum("bnhij,bnhjk->bnhik", tinv, kb)
    u32 = jnp.einsum("bnhij,bnhjk->bnhik", tinv, vb)

    def vjp(dw, du):
        dwh, duh = heads(dw, dk), heads(du, dv)
        dkb = jnp.einsum("bnhij,bnhik->bnhjk", tinv, dwh)  # T^T dW
        dvb = jnp.einsum("bnhij,bnhik->bnhjk", tinv, duh)
        da = -(jnp.einsum("bnhik,bnhjk->bnhij", dkb, w32) + jnp.einsum("bnhik,bnhjk->bnhij", dvb, u32))
        da = jnp.where(strict, da, 0.0)
        da_g = da * gamma_mat
        d = da_g * beta_rows
        dkh = (dkb * kscale[..., None] + jnp.einsum("bnhij,bnhjk->bnhik", d, kh)
               + jnp.einsum("bnhij,bnhik->bnhjk", d, kh))
        s_kb = jnp.sum(dkb * kh, axis=-1)  # dKB_i . k_i: [B, N, H, C]
        dbeta = s_kb * gamma_vec + jnp.sum(dvb * vh, axis=-1) + jnp.sum(da_g * kk, axis=-1)
        dgc = None
        if gc is not None:
            p = da * a
            dgc = s_kb * kscale + jnp.sum(p, axis=-1) - jnp.sum(p, axis=-2)
            dgc = dgc.transpose(0, 2, 1, 3).reshape(b, h, t)
        return tokens(dkh), tokens(dvb * bh[..., None]), dbeta.transpose(0, 1, 3, 2).reshape(b, t, h), dgc

    w = tokens(w32).astype(k.dtype)
    u = tokens(u32).astype(v.dtype)
    return w, u, vjp
