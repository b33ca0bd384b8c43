"""The per-chunk math of AllMem's TTT-MLP memory (spec/ALLMEM.md §3.3-3.5): read, manual inner gradients, write.

This is the single source of truth for one chunk; the parallel scan and the decode step in `ttt.py` both call
`chunk_write` and `read`, so they cannot drift apart.

Fast weights per head, layout [B, H, out, in] (float32):
  W0 [B, H, dh, dk], W1 [B, H, dv, dh], W2 [B, H, dh, dk],   f_W(u) = u + W1 (SiLU(W0 u) * (W2 u)),  dv == dk.
Token-major chunk inputs [B, C, H, ...] (the user-facing layout; einsum absorbs the transposes).
Matmul operands are cast to a compute dtype (the dtype of the token inputs: bf16 stays bf16) and accumulate in float32
via `preferred_element_type`; every elementwise step runs in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ROW_NORM_EPS = 1e-5  # RowNorm(W)[r] = W[r] / (||W[r]|| + eps), LaCT's convention (ALLMEM.md §3.5)
INNER_LOSSES = ("mse", "dot")
RENORMS = ("read_raw", "post_write")


class TTTState(NamedTuple):
    """Recurrent state after the last completed chunk. Each field is a triple (W0, W1, W2) of float32 [B, H, out, in].

    `weights` holds the raw fast weights W~ (what the next chunk reads in "read_raw" mode); `momentum` the
    momentum accumulator M of the inner optimiser.
    """

    weights: tuple
    momentum: tuple


def _mm(eq, x, y, dtype):
    """einsum with operands in `dtype` and float32 accumulation (bf16 MXU/tensor-core path, exact in float32)."""
    x, y = x.astype(dtype), y.astype(dtype)
    if dtype != jnp.float32 and jax.default_backend() == "cpu":
        # XLA:CPU rejects some bf16 x bf16 -> f32 dots ("Unsupported element type for DotThunk"). Products of bf16
        # values are exact in float32, so upcasting after the rounding computes the same numbers.
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return jnp.einsum(eq, x, y, preferred_element_type=jnp.float32)


def row_norms(w0):
    """Target row norms rho of the learned initial weights: triple of float32 [H, out]."""
    return tuple(jnp.linalg.norm(w.astype(jnp.float32), axis=-1) for w in w0)


def renormalize(weights, rho):
    """RowNorm(W) * rho for a triple of [B, H, out, in] weights and a triple of [H, out] targets."""
    out = []
    for w, r in zip(weights, rho):
        norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=-1, keepdims=True))
        out.append(w / (norm + ROW_NORM_EPS) * r[None, :, :, None])
    return tuple(out)


def _hidden(weights, u, dtype):
    """Pre-activations a = W0 u, b = W2 u for tokens u [B, C, H, dk]: two float32 [B, C, H, dh]."""
    w0, _, w2 = weights
    return _mm("bchk,bhdk->bchd", u, w0, dtype), _mm("bchk,bhdk->bchd", u, w2, dtype)


def read(weights, q, dtype=None):
    """Memory read o = f_W(q) for queries q [B, C, H, dk]: float32 [B, C, H, dv]. No state change."""
    dtype = dtype or q.dtype
    a, b = _hidden(weights, q, dtype)
    g = jax.nn.silu(a) * b
    return q.astype(jnp.float32) + _mm("bchd,bhvd->bchv", g, weights[1], dtype)


def inner_grads(weights, k, v, lr, inner_loss="mse", dtype=None):
    """Manual gradients G_i = sum_t lr[t, i] * dl_t/dW_i at `weights` (ALLMEM.md §3.4), one triple [B, H, out, in].

    k [B, C, H, dk], v [B, C, H, dv], lr [B, C, H, 3] (one rate per matrix W0, W1, W2).
    inner_loss "mse": l_t = 1/2 ||f(k_t) - v_t||^2;  "dot": l_t = -f(k_t)^T v_t.
    """
    dtype = dtype or k.dtype
    lr = lr.astype(jnp.float32)
    a, b = _hidden(weights, k, dtype)
    sig = jax.nn.sigmoid(a)
    s = a * sig  # SiLU(a)
    g = s * b
    if inner_loss == "mse":
        f = k.astype(jnp.float32) + _mm("bchd,bhvd->bchv", g, weights[1], dtype)
        e = f - v.astype(jnp.float32)  # dl/df
    elif inner_loss == "dot":
        e = -v.astype(jnp.float32)  # dl/df does not depend on W: no forward through W1 needed
    else:
        raise ValueError(f"inner_loss must be one of {INNER_LOSSES}, got {inner_loss!r}")
    g1 = _mm("bchv,bchd->bhvd", e * lr[..., 1:2], g, dtype)
    dg = _mm("bchv,bhvd->bchd", e, weights[1], dtype)  # W1^T e, row form
    dsilu = sig * (1.0 + a * (1.0 - sig))
    da = dg * b * dsilu
    db = dg * s
    g0 = _mm("bchd,bchk->bhdk", da * lr[..., 0:1], k, dtype)
    g2 = _mm("bchd,bchk->bhdk", db * lr[..., 2:3], k, dtype)
    return g0, g1, g2


def chunk_write(state, k, v, lr, momentum, forget, rho, *, renorm="read_raw", inner_loss="mse",
                detach_inner_grads=False):
    """One chunk write (ALLMEM.md §3.5) on a COMPLETE chunk; returns the new TTTState.

    k [B, C, H, dk], v [B, C, H, dv], lr [B, C, H, 3], momentum [B, C, H] (averaged over the chunk: beta_c),
    forget [B, C, H] or None (gamma_c = 1 - mean forget; None means gamma = 1 exactly), rho triple [H, out].
      read_raw:   Wbar = RowNorm(W~) rho; G at Wbar; M = beta M + G; W~ = gamma Wbar - M
      post_write: Wbar = W~;              G at Wbar; M = beta M + G; W~ = RowNorm(gamma Wbar - M) rho
    `detach_inner_grads` stops the outer gradient through G (first-order ablation / sanity contrast only).
    """
    if renorm == "read_raw":
        wbar = renormalize(state.weights, rho)
    elif renorm == "post_write":
        wbar = state.weights
    else:
        raise ValueError(f"renorm must be one of {RENORMS}, got {renorm!r}")
    grads = inner_grads(wbar, k, v, lr, inner_loss)
    if detach_inner_grads:
        grads = jax.lax.stop_gradient(grads)
    beta = jnp.mean(momentum.astype(jnp.float32), axis=1)[:, :, None, None]  # [B, H, 1, 1]
    new_m = tuple(beta * m + g for m, g in zip(state.momentum, grads))
    if forget is not None:
        gamma = 1.0 - jnp.mean(forget.astype(jnp.float32), axis=1)[:, :, None, None]
        wbar = tuple(gamma * w for w in wbar)
    new_w = tuple(w - m for w, m in zip(wbar, new_m))
    if renorm == "post_write":
        new_w = renormalize(new_w, rho)
    return TTTState(new_w, new_m)
