"""Mamba2 SSD chunk scan as Pallas kernels, forward and backward (jax.custom_vjp).

Recurrence per head h (state S: [P, N] float32, value-major as in mamba_ssm), with d_t the final step size (bias and
softplus already applied by the op) and head h reading B/C group h // (H / G):

    S <- exp(d_t A_h) S + d_t x_t B_t^T;     y_t = S C_t

Inside a chunk of L tokens starting from S0, with a_i = A (d_1 + .. + d_i) the chunk-local cumulative log decay:

    y  = M x + e^{a} * (C S0^T),      M_ij = (C_i . B_j) e^{a_i - a_j} d_j   (j <= i, masked BEFORE exp)
    S1 = e^{a_L} S0 + Xw^T B,         Xw_j = x_j d_j e^{a_L - a_j}

Plan (same structure as pallas_kernels/delta_rule.py):
  * XLA: pad T to a multiple of the chunk with d = 0 (padded tokens neither decay nor write), chunk-local cumsum of
    d A (pallas_kernels.common.chunk_cumsum), time-major -> head-major layout of d.
  * Forward kernel, grid (B, H, P / block_p), sequential over chunks with the [block_p, N] state kept on chip: no
    per-chunk state goes through HBM. Splitting P multiplies the parallelism beyond B*H (rows of S are independent).
  * Backward: a states-only rerun of the forward recurrence (no C, no y) saves each chunk's start state; a second
    kernel sweeps the chunks in reverse carrying only dS (one small product per chunk; split over P the same way) and
    saves each chunk's end-state gradient; a third, with one program per (sequence, head, P block, chunk), writes dx,
    dB, dC, the gradient of d as a direct factor and of the cumulative decay a (the sequential sweep holding all of
    that ran B*H*P/block_p programs: 64 at B1 H16 P128, half an H100). jax.vjp of the cheap XLA cumsum turns the
    latter into gradients of d and A. Per-P-block partial sums (dB, dC, dd, da) and the per-head dB, dC of heads
    sharing a group are reduced by XLA. Memory: the start states and the end-state gradients, [B, H, T/chunk, P, N]
    float32 each.

Kernel bodies use only generic Pallas ops (ref indexing with pl.ds, lax.fori_loop, dot_general), so interpret mode on
CPU runs the same body that the GPU (Triton lowering) compiles. Imports only jax/numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import F32, FEW_PROGRAMS, check_rank, chunk_cumsum, pad_time, triton_params
from pallas_kernels.common import dot as _dot, dot_nt as _dot_nt, dot_tn as _dot_tn

# GPU tuning knobs. The [L, L] intra-chunk matrices live in registers, so the kernel chunk is capped well below the
# XLA form's 256; the math does not depend on the chunk (only float32 rounding does).
KERNEL_CHUNK = 64
DEFAULT_BLOCK_P = 32  # B1 H16 P128: 64 programs; smaller blocks add programs but recompute C B^T per block
FWD_WARPS = 4
# Warps of the chunk-parallel backward kernel (H100 fwd+bwd, P block 64: 4 warps 7.69 / 5.35 ms vs 8 warps 8.05 /
# 5.46 at P 128 / 64; one timing each, seventh session).
BWD_WARPS = 4
# Triton pipelining stages of the forward's chunk loop. H100, B1 T32768 H16 P128 N128 (64 programs; `bench_ssd.py
# --stages-only`, fifth session): forward 1 stage 1.43 ms, 2: 1.32, 3: 0.94-1.04, 4: 1.14. As in the delta rule's
# forward, the extra stage is taken only where programs are few (common.FEW_PROGRAMS) and the state is at most 128
# wide (untested above: its buffers double).
FWD_STAGES = 3
FWD_STAGES_WIDE = 2
FWD_STAGES_MAX_PROGRAMS = FEW_PROGRAMS
# Stages of the backward's dS sweep (a loop of one small product per chunk). 2 is what the seventh session's timings
# ran with, not compared with 1 or 3 (the fifth session's 1 was measured for the old sweep that held every
# gradient). The chunk-parallel kernel has no loop to pipeline.
BWD_STAGES = 2
# P block of the chunk-parallel backward kernel (its grid is large already, so wider blocks only cut the recomputed
# C B^T and the per-block partial sums of dB, dC); the state sweep keeps the forward's block_p. H100 fwd+bwd at
# B1 T32768 H16 P128 (8 warps): 32 8.97 ms, 64 7.88, 128 8.77; P64: 32 6.02, 64 5.36.
BWD_BLOCK_P = 64


def _fwd_stages(programs: int, n_state: int) -> int:
    return FWD_STAGES if n_state <= 128 and programs <= FWD_STAGES_MAX_PROGRAMS else FWD_STAGES_WIDE


def _pl():
    from jax.experimental import pallas as pl  # lazy: importing Pallas is slow

    return pl


def _chunk_total(a, chunk):
    """(a_L, the mask of the last row) from the chunk-local cumulative log decay a [L]: a masked sum, since the
    kernels cannot index a vector by position."""
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    return jnp.sum(jnp.where(is_last, a, 0.0)), is_last


def _chunk_decays(a, chunk):
    """From the chunk-local cumulative log decay a [L]: a_L (scalar), the masked decay matrix E_ij = e^{a_i - a_j}
    (j <= i, else 0) and the last-row mask."""
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    a_last, is_last = _chunk_total(a, chunk)
    # Mask before exp: above the diagonal a_i - a_j >= 0 grows and could overflow.
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, a[:, None] - a[None, :], 0.0)), 0.0)
    return a_last, decay, is_last


def _sequential_program(pl, block_p, heads_per_group):
    """A sequential kernel's program (grid B, H, P / block_p): sequence b, head h, its B/C group, its rows of P."""
    b, h, ip = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return b, h, h // heads_per_group, pl.ds(ip * block_p, block_p)


def _next_state(s, x, d, a, a_last, bm, cdt):
    """The state at a chunk's end from its start S: e^{a_L} S + (x d e^{a_L - a})^T B (the forward and the states
    kernel share it, so the backward's recomputed states are the forward's)."""
    x_w = x.astype(F32) * (d * jnp.exp(a_last - a))[:, None]
    return jnp.exp(a_last) * s + _dot_tn(x_w, bm, cdt)


def _fwd_kernel(x_ref, d_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, ht_ref, *, chunk, n_chunks, block_p,
                heads_per_group):
    pl = _pl()
    b, h, grp, ps = _sequential_program(pl, block_p, heads_per_group)
    cdt = x_ref.dtype

    def body(c, s):
        ts = pl.ds(c * chunk, chunk)
        x = x_ref[b, ts, h, ps]
        d = d_ref[b, h, ts]
        a = a_ref[b, h, ts]
        bm = b_ref[b, ts, grp, :]
        cm = c_ref[b, ts, grp, :]
        a_last, decay, _ = _chunk_decays(a, chunk)
        scores = _dot_nt(cm, bm, cdt) * decay * d[None, :]
        y = _dot(scores, x, cdt) + jnp.exp(a)[:, None] * _dot_nt(cm, s, cdt)
        y_ref[b, ts, h, ps] = y.astype(y_ref.dtype)
        return _next_state(s, x, d, a, a_last, bm, cdt)

    s = lax.fori_loop(0, n_chunks, body, h0_ref[b, h, ps, :].astype(F32))
    ht_ref[b, h, ps, :] = s


def _states_kernel(x_ref, d_ref, a_ref, b_ref, h0_ref, st_ref, *, chunk, n_chunks, block_p, heads_per_group):
    """Each chunk's start state (st [B,H,n,P,N] f32), for the backward: the forward's recurrence without its output
    (no C, no scores, no y), S <- e^{a_L} S + (x d e^{a_L - a})^T B."""
    pl = _pl()
    b, h, grp, ps = _sequential_program(pl, block_p, heads_per_group)
    cdt = x_ref.dtype

    def body(c, s):
        ts = pl.ds(c * chunk, chunk)
        st_ref[b, h, c, ps, :] = s
        a = a_ref[b, h, ts]
        return _next_state(s, x_ref[b, ts, h, ps], d_ref[b, h, ts], a, _chunk_total(a, chunk)[0], b_ref[b, ts, grp, :],
                           cdt)

    lax.fori_loop(0, n_chunks, body, h0_ref[b, h, ps, :].astype(F32))


def _dstate_kernel(a_ref, c_ref, dy_ref, dht_ref, dst_ref, dh0_ref, *, chunk, n_chunks, block_p, heads_per_group):
    """The reverse sweep's only sequential part: dS at the end of every chunk (dst [B,H,n,P,N] f32), from
    dS0 = e^{a_L} dS1 + (dy e^{a})^T C, and dh0."""
    pl = _pl()
    b, h, grp, ps = _sequential_program(pl, block_p, heads_per_group)
    cdt = dy_ref.dtype

    def body(i, ds1):
        c = n_chunks - 1 - i
        ts = pl.ds(c * chunk, chunk)
        dst_ref[b, h, c, ps, :] = ds1
        a = a_ref[b, h, ts]
        a_last, _ = _chunk_total(a, chunk)
        dy_e = dy_ref[b, ts, h, ps].astype(F32) * jnp.exp(a)[:, None]
        return jnp.exp(a_last) * ds1 + _dot_tn(dy_e, c_ref[b, ts, grp, :].astype(F32), cdt)

    dh0_ref[b, h, ps, :] = lax.fori_loop(0, n_chunks, body, dht_ref[b, h, ps, :].astype(F32))


def _bwd_kernel(x_ref, d_ref, a_ref, b_ref, c_ref, st_ref, dst_ref, dy_ref,
                dx_ref, db_ref, dc_ref, dd_ref, da_ref, *, chunk, block_p, heads_per_group):
    """One chunk's gradients, given its start state S0 (st) and the gradient dS1 of its end state (dst): no carry,
    so every (sequence, head, P block, chunk) is its own program."""
    pl = _pl()
    b, h, ip, c = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    grp = h // heads_per_group
    ps = pl.ds(ip * block_p, block_p)
    cdt = x_ref.dtype
    ts = pl.ds(c * chunk, chunk)
    s0 = st_ref[b, h, c, ps, :]
    ds1 = dst_ref[b, h, c, ps, :]
    x = x_ref[b, ts, h, ps].astype(F32)
    d = d_ref[b, h, ts]
    a = a_ref[b, h, ts]
    bm = b_ref[b, ts, grp, :].astype(F32)
    cm = c_ref[b, ts, grp, :].astype(F32)
    dy = dy_ref[b, ts, h, ps].astype(F32)
    a_last, decay, is_last = _chunk_decays(a, chunk)
    ea = jnp.exp(a)
    to_end = jnp.exp(a_last - a)  # e^{a_L - a_j}
    cb = _dot_nt(cm, bm, cdt)
    cb_decay = cb * decay
    scores = cb_decay * d[None, :]  # M
    x_w = x * (d * to_end)[:, None]

    # y = M x + e^a (C S0^T):  gradients of x, S0 and (through M) of C B^T.
    d_scores = _dot_nt(dy, x, cdt)  # dL/dM
    dy_e = dy * ea[:, None]
    dxw = _dot_nt(bm, ds1, cdt)  # dL/dXw [L, block_p], from S1 = e^{a_L} S0 + Xw^T B
    dx = _dot_tn(scores, dy, cdt) + dxw * (d * to_end)[:, None]
    d_cb = d_scores * decay * d[None, :]
    dc = _dot(d_cb, bm, cdt) + _dot(dy_e, s0, cdt)
    db = _dot_tn(d_cb, cm, cdt) + _dot(x_w, ds1, cdt)

    # d enters as a factor of M's column j and of Xw_j; a through e^{a_i - a_j}, e^{a_i} and e^{a_L (- a_j)}.
    q = d_scores * cb_decay  # dL/dM_ij * dM_ij/dd_j
    w = q * d[None, :]  # dL/d(a_i - a_j)
    read = jnp.sum(dy_e * _dot_nt(cm, s0, cdt), axis=1)  # from e^{a_i} (C S0^T)_i
    u = jnp.sum(dxw * x, axis=1) * to_end  # dL/dd_j through Xw_j
    dd = jnp.sum(q, axis=0) + u
    da_last = jnp.sum(d * u) + jnp.exp(a_last) * jnp.sum(ds1 * s0)
    da = jnp.sum(w, axis=1) - jnp.sum(w, axis=0) + read - d * u + jnp.where(is_last, da_last, 0.0)

    dx_ref[b, ts, h, ps] = dx.astype(dx_ref.dtype)
    db_ref[ip, b, ts, h, :] = db
    dc_ref[ip, b, ts, h, :] = dc
    dd_ref[ip, b, h, ts] = dd
    da_ref[ip, b, h, ts] = da


def _run_forward(x, d_hm, a_hm, bm, cm, h0, *, chunk, block_p, interpret):
    """x [B,Tp,H,P]; d_hm, a_hm [B,H,Tp] f32; bm, cm [B,Tp,G,N]; h0 [B,H,P,N] f32 (Tp a multiple of chunk).
    Returns (y [B,Tp,H,P] x.dtype, final state [B,H,P,N] f32)."""
    pl = _pl()
    b, t, h, p = x.shape
    g, n_state = bm.shape[2], bm.shape[3]
    n = t // chunk
    out_shape = (jax.ShapeDtypeStruct((b, t, h, p), x.dtype), jax.ShapeDtypeStruct((b, h, p, n_state), F32))
    kernel = functools.partial(_fwd_kernel, chunk=chunk, n_chunks=n, block_p=block_p, heads_per_group=h // g)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, p // block_p), interpret=interpret,
                          compiler_params=triton_params(FWD_WARPS, _fwd_stages(b * h * (p // block_p), n_state)),
                          name="ssd_fwd")(x, d_hm, a_hm, bm, cm, h0)


def _run_states(x, d_hm, a_hm, bm, h0, *, chunk, block_p, interpret):
    """Each chunk's start state [B,H,Tp/chunk,P,N] f32 (the backward's recompute; the forward never stores them)."""
    pl = _pl()
    b, t, h, p = x.shape
    g, n_state = bm.shape[2], bm.shape[3]
    kernel = functools.partial(_states_kernel, chunk=chunk, n_chunks=t // chunk, block_p=block_p,
                               heads_per_group=h // g)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b, h, t // chunk, p, n_state), F32),
                          grid=(b, h, p // block_p), interpret=interpret,
                          compiler_params=triton_params(FWD_WARPS, _fwd_stages(b * h * (p // block_p), n_state)),
                          name="ssd_states")(x, d_hm, a_hm, bm, h0)


def _run_backward(x, d_hm, a_hm, bm, cm, states, dy, dht, *, chunk, block_p, interpret):
    """Reverse sweep: the state gradients first (sequential, one small product per chunk), then every chunk's
    gradients in parallel. Returns dx [B,Tp,H,P] f32, dB and dC per head [B,Tp,H,N] f32, dd and da [B,H,Tp] f32 (d
    as a direct factor; a the chunk-local cumulative log decay) and dh0 [B,H,P,N] f32."""
    pl = _pl()
    b, t, h, p = x.shape
    g, n_state = bm.shape[2], bm.shape[3]
    n = t // chunk
    n_p = p // block_p
    sweep = functools.partial(_dstate_kernel, chunk=chunk, n_chunks=n, block_p=block_p, heads_per_group=h // g)
    dstates, dh0 = pl.pallas_call(
        sweep, out_shape=(jax.ShapeDtypeStruct((b, h, n, p, n_state), F32), jax.ShapeDtypeStruct((b, h, p, n_state), F32)),
        grid=(b, h, n_p), interpret=interpret, compiler_params=triton_params(FWD_WARPS, BWD_STAGES),
        name="ssd_bwd_states")(a_hm, cm, dy, dht)
    if p % min(p, BWD_BLOCK_P) == 0:  # the chunk-parallel kernel's own P block where it divides P
        block_p = min(p, BWD_BLOCK_P)
        n_p = p // block_p
    out_shape = (jax.ShapeDtypeStruct((b, t, h, p), F32),
                 jax.ShapeDtypeStruct((n_p, b, t, h, n_state), F32),
                 jax.ShapeDtypeStruct((n_p, b, t, h, n_state), F32),
                 jax.ShapeDtypeStruct((n_p, b, h, t), F32),
                 jax.ShapeDtypeStruct((n_p, b, h, t), F32))
    kernel = functools.partial(_bwd_kernel, chunk=chunk, block_p=block_p, heads_per_group=h // g)
    dx, db, dc, dd, da = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, h, n_p, n), interpret=interpret,
        compiler_params=triton_params(BWD_WARPS, 1), name="ssd_bwd")(x, d_hm, a_hm, bm, cm, states,
                                                                               dstates, dy)
    return dx, db.sum(0), dc.sum(0), dd.sum(0), da.sum(0), dh0


def _decay_cumsum(d, A, chunk):
    """d [B,T,H] f32 (T a multiple of chunk), A [H] -> chunk-local cumsum of d A, head-major [B,H,T] f32."""
    return chunk_cumsum(d * A.astype(F32), chunk)


def _padded_inputs(x, d, bm, cm, chunk):
    """Zero padding of the time axis: d = 0 on padded tokens, so they neither decay nor write."""
    return (pad_time(x, chunk)[0], pad_time(d.astype(F32), chunk)[0], pad_time(bm, chunk)[0],
            pad_time(cm, chunk)[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ssd_core(x, d, A, bm, cm, h0, chunk, block_p, interpret):
    y, ht = _core_fwd(x, d, A, bm, cm, h0, chunk, block_p, interpret)
    return y, ht


def _core_fwd(x, d, A, bm, cm, h0, chunk, block_p, interpret):
    t = x.shape[1]
    xp, dp, bp, cp = _padded_inputs(x, d, bm, cm, chunk)
    a_hm = _decay_cumsum(dp, A, chunk)
    y, ht = _run_forward(xp, dp.transpose(0, 2, 1), a_hm, bp, cp, h0, chunk=chunk, block_p=block_p,
                         interpret=interpret)
    return y[:, :t], ht


def _core_vjp_fwd(x, d, A, bm, cm, h0, chunk, block_p, interpret):
    return _core_fwd(x, d, A, bm, cm, h0, chunk, block_p, interpret), (x, d, A, bm, cm, h0)


def _core_vjp_bwd(chunk, block_p, interpret, res, cts):
    x, d, A, bm, cm, h0 = res
    dy, dht = cts
    b, t, h, _ = x.shape
    g, n_state = bm.shape[2], bm.shape[3]
    xp, dp, bp, cp = _padded_inputs(x, d, bm, cm, chunk)
    a_hm, cumsum_vjp = jax.vjp(lambda d_, a_: _decay_cumsum(d_, a_, chunk), dp, A)
    d_hm = dp.transpose(0, 2, 1)
    # Recompute each chunk's start state (written to HBM only in the backward, where the reverse sweep needs it).
    states = _run_states(xp, d_hm, a_hm, bp, h0, chunk=chunk, block_p=block_p, interpret=interpret)
    dyp = pad_time(dy.astype(x.dtype), chunk)[0]
    dx, db, dc, dd_direct, da, dh0 = _run_backward(xp, d_hm, a_hm, bp, cp, states, dyp, dht.astype(F32),
                                                   chunk=chunk, block_p=block_p, interpret=interpret)
    dd_cumsum, dA = cumsum_vjp(da)
    dd = dd_cumsum + dd_direct.transpose(0, 2, 1)
    # Heads sharing a group add their B, C gradients.
    db = db[:, :t].reshape(b, t, g, h // g, n_state).sum(3)
    dc = dc[:, :t].reshape(b, t, g, h // g, n_state).sum(3)
    return (dx[:, :t].astype(x.dtype), dd[:, :t].astype(d.dtype), dA.astype(A.dtype), db.astype(bm.dtype),
            dc.astype(cm.dtype), dh0.astype(h0.dtype))


_ssd_core.defvjp(_core_vjp_fwd, _core_vjp_bwd)


def ssd_scan(x, d, A, B, C, *, initial_state=None, chunk_size=KERNEL_CHUNK, block_p=None, interpret=None):
    """Mamba2 SSD scan (Pallas), differentiable in x, d, A, B, C and initial_state.

    x [B,T,H,P] (bf16 or f32); d [B,T,H] final step sizes (>= 0; bias and softplus are the caller's); A [H]; B, C
    [B,T,G,N] with H % G == 0; initial_state [B,H,P,N] (None = zeros). No D skip.
    Returns (y [B,T,H,P] in x's dtype, final_state [B,H,P,N] float32). `interpret=None` runs in interpret mode where
    there is no GPU; `block_p` (dividing P) splits the state rows across programs.
    """
    check_rank("x", x, 4)
    check_rank("d", d, 3)
    check_rank("B", B, 4)
    bsz, t, h, p = x.shape
    if d.shape != (bsz, t, h):
        raise ValueError(f"d must have shape {(bsz, t, h)} (x without its last axis), got {tuple(d.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must have shape ({h},), got {tuple(A.shape)}")
    if C.shape != B.shape or B.shape[:2] != (bsz, t):
        raise ValueError(f"B{tuple(B.shape)} and C{tuple(C.shape)} must both be [B,T,G,N] with B,T = {(bsz, t)}")
    g, n_state = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"the number of heads of x ({h}) must be a multiple of the groups of B and C ({g})")
    if initial_state is not None and initial_state.shape != (bsz, h, p, n_state):
        raise ValueError(f"initial_state must have shape {(bsz, h, p, n_state)}, got {tuple(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if block_p is None:
        block_p = DEFAULT_BLOCK_P if p % DEFAULT_BLOCK_P == 0 else p
    if p % block_p:
        raise ValueError(f"block_p={block_p} must divide the head dimension P={p} of x")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    h0 = jnp.zeros((bsz, h, p, n_state), F32) if initial_state is None else initial_state.astype(F32)
    return _ssd_core(x, d, A, B, C, h0, int(chunk_size), int(block_p), bool(interpret))


def ssd_impl(x, dt, A, B, C, *, initial_states=None, chunk_size=256):
    """Adapter for ahn_jax.ops dispatch (impl="pallas" of op "ssd"): dt is the final step size d (float32), no D.
    The op's chunk_size (256 for the XLA form) is capped at KERNEL_CHUNK: the kernel keeps [L, L] tiles on chip."""
    return ssd_scan(x, dt, A, B, C, initial_state=initial_states, chunk_size=min(int(chunk_size), KERNEL_CHUNK))
