"""Mamba2 state-space duality scan (AHN-Mamba2 memory, spec/AHN.md §2.3), pure JAX.

Conventions are mamba_ssm's `mamba_chunk_scan_combined` (without z gating and dt limits: AHN gates its own readout):
x [B,T,H,P], dt [B,T,H], A [H] (negative), B and C [B,T,G,N] with H % G == 0 (head h reads group h // (H/G)),
D [H] or [H,P], state S [B,H,P,N] float32. One step, with d_t = softplus(dt_t + dt_bias) (or dt_t + dt_bias):

    S <- exp(d_t A) S + d_t x_t B_t^T;   y_t = S C_t + D x_t

Chunked form ("chunk", the SSD block decomposition). Inside a chunk starting from state S0, let a_i = d_1 A + .. + d_i A
(cumulative log decay, non-increasing). Unrolling,

    y_i = e^{a_i} S0 C_i + sum_{j<=i} e^{a_i-a_j} (C_i.B_j) d_j x_j        (masked "attention" + state read)
    S_C = e^{a_C} S0 + sum_j e^{a_C-a_j} d_j x_j B_j^T                     (chunk state passed to the next chunk)

Decays are "segment sums" a_i - a_j, masked to j <= i BEFORE exp (above the diagonal the difference is positive and
could overflow), computed in float32 together with the state. The inter-chunk recurrence is a lax.scan over chunks whose
body runs under `jax.checkpoint`: the backward keeps only the chunk-boundary states (DESIGN.md pitfall 11). A length
that is not a multiple of the chunk is padded with x=0, d=0 rows (no decay, no write).

Implementations are chosen through `ops.dispatch` (op name "ssd"): `impl(x, dt, A, B, C, *, initial_states,
chunk_size) -> (y, final_states)` with dt already the final step size d (bias and softplus applied, float32), no D
term, y in x's dtype and final_states float32 [B,H,P,N].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ahn_jax.ops import dispatch

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------------- input handling

def _check(x, dt, A, B, C, D, dt_bias, state, *, step: bool):
    lead = 2 if step else 3  # [B,H] or [B,T,H]
    shape = "[B,H,P]" if step else "[B,T,H,P]"
    bc_shape = "[B,G,N]" if step else "[B,T,G,N]"
    if x.ndim != lead + 1:
        raise ValueError(f"ssd: x must be {shape}-shaped, got x{x.shape}")
    heads = x.shape[lead - 1]
    if dt.shape != x.shape[:lead]:
        raise ValueError(f"ssd: dt{dt.shape} must have shape {x.shape[:lead]} (x without its last axis)")
    if A.shape != (heads,):
        raise ValueError(f"ssd: A{A.shape} must have shape ({heads},) (one value per head)")
    if B.shape != C.shape or B.ndim != lead + 1 or B.shape[:lead - 1] != x.shape[:lead - 1]:
        raise ValueError(f"ssd: B{B.shape} and C{C.shape} must both be {bc_shape} matching x{x.shape}")
    groups = B.shape[lead - 1]
    if heads % groups:
        raise ValueError(f"ssd: number of heads {heads} (x) must be a multiple of the number of groups {groups} (B, C)")
    if D is not None and D.shape not in ((heads,), (heads, x.shape[-1])):
        raise ValueError(f"ssd: D{D.shape} must be [H] or [H,P] = ({heads},) or {(heads, x.shape[-1])}")
    if dt_bias is not None and dt_bias.shape != (heads,):
        raise ValueError(f"ssd: dt_bias{dt_bias.shape} must have shape ({heads},)")
    if state is not None:
        want = (x.shape[0], heads, x.shape[-1], B.shape[-1])
        if state.shape != want:
            raise ValueError(f"ssd: initial state{state.shape} must be [B,H,P,N] = {want}")


def _step_size(dt, dt_bias, dt_softplus):
    """d = softplus(dt + dt_bias) or dt + dt_bias, in float32 (mamba_ssm computes dt in float32)."""
    d = dt.astype(_F32)
    if dt_bias is not None:
        d = d + dt_bias.astype(_F32)
    return jax.nn.softplus(d) if dt_softplus else d


def _skip(y, x, D):
    """y + D x with D [H] or [H,P], added in float32, result in x's dtype. y, x [..., H, P]."""
    if D is None:
        return y.astype(x.dtype)
    d = D.astype(_F32)
    d = d[:, None] if d.ndim == 1 else d
    return (y.astype(_F32) + d * x.astype(_F32)).astype(x.dtype)


# ------------------------------------------------------------------------------------------------- recurrent (truth)

def _one_step(state, x, d, A, B, C):
    """One token: state [B,H,P,N] f32; x [B,H,P]; d [B,H] f32; A [H]; B, C [B,G,N]. Returns (y [B,H,P] f32, state)."""
    reps = x.shape[1] // B.shape[1]
    B = jnp.repeat(B.astype(_F32), reps, axis=1)  # head h reads group h // reps
    C = jnp.repeat(C.astype(_F32), reps, axis=1)
    state = jnp.exp(d * A.astype(_F32))[..., None, None] * state
    state = state + (d[..., None] * x.astype(_F32))[..., :, None] * B[..., None, :]
    return jnp.einsum("bhpn,bhn->bhp", state, C), state


def _ssd_recurrent(x, dt, A, B, C, *, initial_states=None, chunk_size=None):
    """Token-by-token lax.scan with a float32 state: the ground truth. chunk_size is ignored."""
    del chunk_size
    b, _, h, p = x.shape
    state = jnp.zeros((b, h, p, B.shape[-1]), _F32) if initial_states is None else initial_states.astype(_F32)

    def body(s, xs):
        xt, dt_t, bt, ct = xs
        y, s = _one_step(s, xt, dt_t, A, bt, ct)
        return s, y.astype(x.dtype)

    state, y = lax.scan(body, state, tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    return jnp.moveaxis(y, 0, 1), state


# ------------------------------------------------------------------------------------------------------------ chunked

def _to_chunks(a, n_chunks, chunk):
    """[B,T,...] -> [n,B,C,...], zero-padding T up to n*C. Only the chunk axis moves (free for B=1); head-major
    transposes happen per chunk inside the scan body, so no transposed copy of the sequence is materialised."""
    b, t = a.shape[:2]
    a = jnp.pad(a, [(0, 0), (0, n_chunks * chunk - t)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(b, n_chunks, chunk, *a.shape[2:]), 1, 0)


def _chunk_body(state, xs, *, A, out_dtype):
    """One chunk. state [B,G,R,P,N] f32; x [B,C,G,R,P]; d [B,C,G,R] f32; B, C [B,C,G,N]; A [G,R].

    Returns (new state, y [B,C,G,R,P])."""
    x = jnp.moveaxis(xs[0], 1, 3)  # [B,G,R,C,P]
    d = jnp.moveaxis(xs[1], 1, 3)  # [B,G,R,C]
    Bm, Cm = (jnp.swapaxes(m, 1, 2) for m in xs[2:])  # [B,G,C,N]
    c = x.shape[-2]
    on_or_below = jnp.tril(jnp.ones((c, c), bool))
    acum = jnp.cumsum(d * A[..., None], axis=-1)  # [B,G,R,C]
    seg = acum[..., :, None] - acum[..., None, :]
    decay = jnp.where(on_or_below, jnp.exp(jnp.where(on_or_below, seg, 0.0)), 0.0)  # mask before exp

    cb = jnp.einsum("bgin,bgjn->bgij", Cm, Bm, preferred_element_type=_F32)
    scores = cb[:, :, None] * decay * d[..., None, :]  # [B,G,R,C,C]
    x32, b32, c32 = x.astype(_F32), Bm.astype(_F32), Cm.astype(_F32)
    y = jnp.einsum("bgrij,bgrjp->bgrip", scores, x32)
    y = y + jnp.exp(acum)[..., None] * jnp.einsum("bgrpn,bgin->bgrip", state, c32)
    alast = acum[..., -1]
    x_to_end = x32 * (d * jnp.exp(alast[..., None] - acum))[..., None]
    state = jnp.exp(alast)[..., None, None] * state + jnp.einsum("bgrjp,bgjn->bgrpn", x_to_end, b32)
    return state, jnp.moveaxis(y, 3, 1).astype(out_dtype)


def _ssd_chunk(x, dt, A, B, C, *, initial_states=None, chunk_size=256):
    """SSD block decomposition; equal to `_ssd_recurrent` up to float32 rounding."""
    b, t, h, p = x.shape
    g, n_state = B.shape[2], B.shape[3]
    r = h // g
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be >= 1, got {chunk_size}")
    chunk = min(int(chunk_size), t)
    n = -(-t // chunk)
    state = jnp.zeros((b, h, p, n_state), _F32) if initial_states is None else initial_states.astype(_F32)
    state = state.reshape(b, g, r, p, n_state)
    xs = (_to_chunks(x.reshape(b, t, g, r, p), n, chunk),
          _to_chunks(dt.astype(_F32).reshape(b, t, g, r), n, chunk),
          _to_chunks(B, n, chunk),
          _to_chunks(C, n, chunk))
    a = A.astype(_F32).reshape(g, r)

    @jax.checkpoint
    def body(s, chunk_xs):
        return _chunk_body(s, chunk_xs, A=a, out_dtype=x.dtype)

    state, y = lax.scan(body, state, xs)  # y [n,B,C,G,R,P]
    y = jnp.moveaxis(y, 0, 1).reshape(b, n * chunk, h, p)
    return y[:, :t], state.reshape(b, h, p, n_state)


# ------------------------------------------------------------------------------------------------------- public API

def ssd(x, dt, A, B, C, *, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_states=None,
        return_final_states=False, impl="auto"):
    """Mamba2 SSD scan over a sequence (mamba_chunk_scan_combined conventions, no z, no dt limit).

    Args: x [B,T,H,P]; dt [B,T,H]; A [H] (negative); B, C [B,T,G,N] with H % G == 0; D [H] or [H,P]; dt_bias [H];
      initial_states [B,H,P,N] (float32). impl: "auto", "recurrent", "chunk" or a registered kernel.
    Returns: out [B,T,H,P] in x's dtype, or (out, final_states [B,H,P,N] float32) if return_final_states.
    """
    _check(x, dt, A, B, C, D, dt_bias, initial_states, step=False)
    fn = dispatch.resolve("ssd", impl)
    y, state = fn(x, _step_size(dt, dt_bias, dt_softplus), A, B, C, initial_states=initial_states,
                  chunk_size=chunk_size)
    out = _skip(y, x, D)
    return (out, state) if return_final_states else out


def ssd_step(x, dt, A, B, C, state, *, D=None, dt_bias=None, dt_softplus=False):
    """One decoding token. x [B,H,P]; dt [B,H]; A [H]; B, C [B,G,N]; state [B,H,P,N] (None = zeros).

    Returns (out [B,H,P] in x's dtype, new_state [B,H,P,N] float32).
    """
    _check(x, dt, A, B, C, D, dt_bias, state, step=True)
    if state is None:
        state = jnp.zeros((*x.shape, B.shape[-1]), _F32)
    y, state = _one_step(state.astype(_F32), x, _step_size(dt, dt_bias, dt_softplus), A, B, C)
    return _skip(y, x, D), state


dispatch.register("ssd", "recurrent", "ahn_jax.ops.mamba_ssd:_ssd_recurrent", {"cpu": 0, "gpu": 0, "tpu": 0})
dispatch.register("ssd", "chunk", "ahn_jax.ops.mamba_ssd:_ssd_chunk", {"cpu": 1, "gpu": 1, "tpu": 1})
# The Pallas kernel (pallas_kernels/ssd.py, Triton lowering): on CPU only by name, in interpret mode. On GPU "auto"
# takes it: H100, B1 T32768 H16 P128 N128: fwd 1.24 vs 5.48 ms, fwd+bwd 14.9 vs 18.8 ms for "chunk"
# (benchmarks/bench_ssd.py, RESULTS.md). No TPU run yet, so not registered there.
dispatch.register("ssd", "pallas", "pallas_kernels.ssd:ssd_impl", {"gpu": 10, "cpu": None})
