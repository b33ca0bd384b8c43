"""Gated delta rule and delta rule (AHN-GDN / AHN-DN memories, spec/AHN.md §2.1-2.2), pure JAX.

Conventions are flash-linear-attention's `chunk_gated_delta_rule` and transformers' `torch_recurrent_gated_delta_rule`:
q, k [B,T,H,K], v [B,T,H,V], g [B,T,H] log-space decay (<= 0), beta [B,T,H], state S [B,H,K,V] float32. One step:

    S <- exp(g_t) S;   v'_t = beta_t (v_t - S^T k_t);   S <- S + k_t v'_t^T;   o_t = scale * S^T q_t

Chunked form ("chunk", the WY/UT transform). Inside a chunk of C tokens starting from state S0, let c_i = g_1+..+g_i
(cumulative log decay, so c is non-increasing) and u_i = v'_i. Unrolling the recurrence,

    S_i = e^{c_i} S0 + sum_{j<=i} e^{c_i-c_j} k_j u_j^T,
    u_i = beta_i (v_i - e^{c_i} S0^T k_i - sum_{j<i} e^{c_i-c_j} (k_i.k_j) u_j).

Moving the sum to the left side gives a unit lower-triangular system (I + A) U = diag(beta) V - diag(beta e^c) K S0 with
A_ij = beta_i e^{c_i-c_j} (k_i.k_j) for j < i. One triangular solve per chunk gives U0 = (I+A)^-1 diag(beta) V and
W = (I+A)^-1 diag(beta e^c) K, both independent of S0, and then

    U = U0 - W S0
    O = scale * ( (e^c * Q) S0 + (mask_{j<=i}(Q K^T) * e^{c_i-c_j}) U )
    S_C = e^{c_C} S0 + (e^{c_C - c} * K)^T U.

Every exponent is a difference c_i - c_j with j <= i (or c itself), hence <= 0: the causal mask is applied to the
exponent BEFORE exp, so nothing overflows and no inf*0 appears. The triangular solve, decays and state are float32;
bf16 inputs only enter the Q K^T / K K^T products (accumulated in float32). A sequence whose length is not a multiple of
the chunk is padded with q=k=v=0, g=0, beta=0 rows: they neither decay nor write, so the state is unchanged.

The chunk body runs under `jax.checkpoint` inside `lax.scan`, so the backward keeps only the chunk-boundary states
(pitfall 11 in DESIGN.md) and recomputes each chunk's interior.

Implementations are chosen through `ops.dispatch` (op names "gated_delta_rule" and "delta_rule"). An implementation has
the signature `impl(q, k, v, g, beta, *, scale, initial_state, chunk_size) -> (o, final_state)` ("delta_rule" impls take
no g) where q, k are already L2-normalised if asked for, `scale` is a float and `initial_state` is None or float32
[B,H,K,V]; it returns o in v's dtype and the float32 final state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ahn_jax.ops import dispatch

_F32 = jnp.float32


def l2_normalize(x):
    """x * rsqrt(sum(x^2) + 1e-6) over the last axis, computed in float32 (fla chunk kernels' convention); keeps dtype."""
    x32 = x.astype(_F32)
    return (x32 * lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------- checks

def _check_inputs(q, k, v, g, beta, initial_state, *, step: bool):
    """Shape checks with messages that name the tensor. `step` drops the time axis ([B,H,...])."""
    lead = 2 if step else 3  # [B,H] or [B,T,H]
    names = "[B,H,K]" if step else "[B,T,H,K]"
    if q.ndim != lead + 1 or k.ndim != lead + 1 or v.ndim != lead + 1:
        raise ValueError(f"delta rule: q, k, v must be {names}-shaped, got q{q.shape} k{k.shape} v{v.shape}")
    if q.shape != k.shape:
        raise ValueError(f"delta rule: q{q.shape} and k{k.shape} must have the same shape")
    if v.shape[:lead] != q.shape[:lead]:
        raise ValueError(f"delta rule: v{v.shape} must share the leading axes {q.shape[:lead]} of q")
    for name, x in (("g", g), ("beta", beta)):
        if x is not None and x.shape != q.shape[:lead]:
            raise ValueError(f"delta rule: {name}{x.shape} must have shape {q.shape[:lead]} (q without its last axis)")
    if initial_state is not None:
        want = (q.shape[0], q.shape[lead - 1], q.shape[-1], v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(f"delta rule: initial_state{initial_state.shape} must be [B,H,K,V] = {want}")


def _prepare_qk(q, k, scale, use_qk_l2norm):
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return q, k, scale


# ------------------------------------------------------------------------------------------------- recurrent (truth)

def _one_step(state, q, k, v, g, beta, scale):
    """One token for all (B,H): state [B,H,K,V] f32; q,k [B,H,K]; v [B,H,V]; g, beta [B,H] (g may be None)."""
    q, k, v, beta = q.astype(_F32), k.astype(_F32), v.astype(_F32), beta.astype(_F32)
    if g is not None:
        state = state * jnp.exp(g.astype(_F32))[..., None, None]
    v_new = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * v_new[..., None, :]
    out = scale * jnp.einsum("bhkv,bhk->bhv", state, q)
    return out, state


def _gdr_recurrent(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=None):
    """Token-by-token lax.scan with a float32 state: the ground truth. chunk_size is ignored."""
    del chunk_size
    b, _, h, dk = q.shape
    state = jnp.zeros((b, h, dk, v.shape[-1]), _F32) if initial_state is None else initial_state.astype(_F32)
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731

    def body(s, xs):
        qt, kt, vt, gt, bt = xs
        o, s = _one_step(s, qt, kt, vt, gt, bt, scale)
        return s, o.astype(v.dtype)

    state, o = lax.scan(body, state, tuple(time_major(x) for x in (q, k, v, g, beta)))
    return jnp.moveaxis(o, 0, 1), state


def _dr_recurrent(q, k, v, beta, *, scale, initial_state=None, chunk_size=None):
    """Delta rule (no decay) as the recurrent gated form with g absent."""
    return _gdr_recurrent(q, k, v, None, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------------------------ chunked

def _to_chunks(x, n_chunks, chunk):
    """[B,T,H,...] -> [n,B,C,H,...], zero-padding T up to n*C (zero rows are no-ops, see module docstring).

    Only the chunk axis moves to the front (free for B=1): the per-chunk [C,H] -> [H,C] transpose happens inside the
    scan body, so no transposed copy of the whole sequence is materialised.
    """
    b, t = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, n_chunks * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)


def _chunk_body(state, xs, *, scale, out_dtype):
    """One chunk: state [B,H,K,V] f32; q,k [B,C,H,K]; v [B,C,H,V]; g, beta [B,C,H] (g may be None).

    Returns (new state, o [B,C,H,V]).
    """
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in xs[:3])  # [B,H,C,D]
    g, beta = (None if x is None else jnp.swapaxes(x, 1, 2) for x in xs[3:])  # [B,H,C]
    c = q.shape[-2]
    beta = beta.astype(_F32)
    on_or_below = jnp.tril(jnp.ones((c, c), bool))
    below = jnp.tril(jnp.ones((c, c), bool), -1)
    if g is None:
        gcum = jnp.zeros(beta.shape, _F32)
        decay = on_or_below.astype(_F32)
    else:
        gcum = jnp.cumsum(g.astype(_F32), axis=-1)
        diff = gcum[..., :, None] - gcum[..., None, :]
        # Mask the exponent before exp: above the diagonal c_i - c_j > 0 could overflow.
        decay = jnp.where(on_or_below, jnp.exp(jnp.where(on_or_below, diff, 0.0)), 0.0)

    kk = jnp.einsum("bhik,bhjk->bhij", k, k, preferred_element_type=_F32)
    qk = jnp.einsum("bhik,bhjk->bhij", q, k, preferred_element_type=_F32)
    k32, q32 = k.astype(_F32), q.astype(_F32)
    a = jnp.where(below, kk * decay, 0.0) * beta[..., :, None]
    lower = a + jnp.eye(c, dtype=_F32)
    rhs = jnp.concatenate([beta[..., None] * v.astype(_F32), (beta * jnp.exp(gcum))[..., None] * k32], axis=-1)
    sol = lax.linalg.triangular_solve(lower, rhs, left_side=True, lower=True, unit_diagonal=True)
    dv = v.shape[-1]
    u = sol[..., :dv] - jnp.einsum("bhck,bhkv->bhcv", sol[..., dv:], state)

    out = jnp.einsum("bhck,bhkv->bhcv", q32 * jnp.exp(gcum)[..., None], state)
    out = scale * (out + jnp.einsum("bhij,bhjv->bhiv", qk * decay, u))
    glast = gcum[..., -1]
    k_to_end = k32 * jnp.exp(glast[..., None] - gcum)[..., None]
    state = jnp.exp(glast)[..., None, None] * state + jnp.einsum("bhck,bhcv->bhkv", k_to_end, u)
    return state, jnp.swapaxes(out, 1, 2).astype(out_dtype)


def _gdr_chunk(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=64):
    """WY/UT-transform chunked form; equal to `_gdr_recurrent` up to float32 rounding."""
    b, t, h, dk = q.shape
    if chunk_size < 1:
        raise ValueError(f"delta rule: chunk_size must be >= 1, got {chunk_size}")
    chunk = min(int(chunk_size), t)
    n = -(-t // chunk)
    state = jnp.zeros((b, h, dk, v.shape[-1]), _F32) if initial_state is None else initial_state.astype(_F32)
    xs = tuple(None if x is None else _to_chunks(x, n, chunk) for x in (q, k, v, g, beta))

    @jax.checkpoint
    def body(s, chunk_xs):
        return _chunk_body(s, chunk_xs, scale=scale, out_dtype=v.dtype)

    state, o = lax.scan(body, state, xs)  # o [n,B,C,H,V]
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * chunk, h, v.shape[-1])
    return o[:, :t], state


def _dr_chunk(q, k, v, beta, *, scale, initial_state=None, chunk_size=64):
    """Delta rule chunked form: the gated one with the decay terms dropped."""
    return _gdr_chunk(q, k, v, None, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------------------- public API

def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, chunk_size=64, impl="auto"):
    """Gated delta rule over a sequence.

    Args: q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H] log decay (<= 0); beta [B,T,H]; initial_state [B,H,K,V] (float32).
      scale defaults to K**-0.5; use_qk_l2norm normalises q and k first (float32, eps 1e-6 inside the rsqrt).
      impl: "auto", "recurrent", "chunk" or a registered kernel (see `ops.dispatch`).
    Returns: (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32 or None unless output_final_state).
    """
    _check_inputs(q, k, v, g, beta, initial_state, step=False)
    q, k, scale = _prepare_qk(q, k, scale, use_qk_l2norm)
    fn = dispatch.resolve("gated_delta_rule", impl)
    o, state = fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
    return o, (state if output_final_state else None)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm=False, chunk_size=64, impl="auto"):
    """Delta rule (no decay): `gated_delta_rule` with g = 0. Same shapes, minus g."""
    _check_inputs(q, k, v, None, beta, initial_state, step=False)
    q, k, scale = _prepare_qk(q, k, scale, use_qk_l2norm)
    fn = dispatch.resolve("delta_rule", impl)
    o, state = fn(q, k, v, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
    return o, (state if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False):
    """One decoding token. q, k [B,H,K]; v [B,H,V]; g, beta [B,H]; state [B,H,K,V] (None = zeros).

    Returns (o [B,H,V] in v's dtype, new_state [B,H,K,V] float32).
    """
    _check_inputs(q, k, v, g, beta, state, step=True)
    q, k, scale = _prepare_qk(q, k, scale, use_qk_l2norm)
    if state is None:
        state = jnp.zeros((*q.shape, v.shape[-1]), _F32)
    o, state = _one_step(state.astype(_F32), q, k, v, g, beta, scale)
    return o.astype(v.dtype), state


def delta_rule_step(q, k, v, beta, state, *, scale=None, use_qk_l2norm=False):
    """One decoding token of the delta rule: `gated_delta_rule_step` without g."""
    return gated_delta_rule_step(q, k, v, None, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)


_EVERYWHERE = ("cpu", "gpu", "tpu")
dispatch.register("gated_delta_rule", "recurrent", "ahn_jax.ops.gated_delta:_gdr_recurrent",
                  {b: 0 for b in _EVERYWHERE})
dispatch.register("gated_delta_rule", "chunk", "ahn_jax.ops.gated_delta:_gdr_chunk", {b: 1 for b in _EVERYWHERE})
dispatch.register("delta_rule", "recurrent", "ahn_jax.ops.gated_delta:_dr_recurrent", {b: 0 for b in _EVERYWHERE})
dispatch.register("delta_rule", "chunk", "ahn_jax.ops.gated_delta:_dr_chunk", {b: 1 for b in _EVERYWHERE})
# Pallas kernels (pallas_kernels/delta_rule.py): measured ~5x faster than "chunk" on an H100 (benchmarks/RESULTS.md);
# on CPU they run in interpret mode only when asked for by name; never run on a TPU yet, so not registered there.
dispatch.register("gated_delta_rule", "pallas", "pallas_kernels.delta_rule:gated_delta_rule_impl",
                  {"gpu": 10, "cpu": None})
dispatch.register("delta_rule", "pallas", "pallas_kernels.delta_rule:delta_rule_impl", {"gpu": 10, "cpu": None})
