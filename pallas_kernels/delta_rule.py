"""Chunked (gated) delta rule as Pallas kernels, forward and backward (jax.custom_vjp).

Recurrence per head (state S: [K, V] float32):  S <- e^{g_t} S;  v' = beta_t (v_t - S^T k_t);  S <- S + k_t v'^T;
o_t = scale * S^T q_t.  `g=None` is the plain delta rule.

Plan (see benchmarks/NOTES_delta_rule.md):
  (a) Parallel over chunks: chunk-local cumsum of g (XLA) and the WY factors W, U (Pallas kernel, grid (B, H, chunk),
      triangular inverse on chip; pallas_kernels.common.wy_factors is its XLA twin, differentiated in the backward).
  (b) One Pallas kernel, grid (B, H, V / block_v), sequential over chunks with the [K, block_v] state kept on chip:
        u' = U - W S;  o = scale * (gamma*Q S + mask(Q K^T * Gamma) u');  S = e^{g_last} S + (K * e^{g_last - gc})^T u'.
      The recurrence is independent per value column given W, so splitting V multiplies the parallelism beyond B*H
      for batch-1 long sequences, and no per-chunk state goes through HBM in the forward.
  Backward (default WY_BWD = "explicit"): W, U recomputed in XLA from T = (I + A)^-1 (formed once per chunk with
  matmuls); a states-only rerun of the forward recurrence saving each chunk's start state and u'; the intra-chunk
  scores once per chunk (a small kernel); the sweep's dS-independent terms parallel over chunks; a sequential kernel
  sweeping the chunks in reverse carrying dS (split over V, two small products per chunk) that writes du' and each
  chunk's dS; a kernel parallel over chunks forming dq, dk, dw with the V blocks summed on chip; and the WY
  preparation's matmul-only VJP from the same T (pallas_kernels.common.wy_factors_and_vjp). The older preparation
  backwards stay behind the WY_BWD switch for timing.

Kernel bodies use only generic Pallas ops (ref indexing with pl.ds, lax.fori_loop, dot_general), so interpret mode on
CPU runs the same body that the GPU (Triton lowering) compiles. Imports only jax/numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import (F32, FEW_PROGRAMS, check_rank, chunk_cumsum, dot, dot_nt, dot_tn, pad_time,
                                   pallas_module, triton_params, wy_factors, wy_factors_and_vjp)
from pallas_kernels.delta_rule_wy import wy_factors_pallas, wy_factors_vjp_pallas  # noqa: F401 - re-exported

# Tuning knobs (GPU): value-block width when the caller gives none, and Triton warps per program. Batch-1 long
# sequences need block_v small enough that B*H*V/block_v programs fill the GPU's SMs (benchmarks/NOTES_delta_rule.md).
DEFAULT_BLOCK_V = 16  # best on the H100 at B1 T32768 H16 D128: with PRECOMPUTE_ATTN 64: 2.28 ms, 32: 1.55, 16: 1.51
FWD_WARPS = 4
# Triton software-pipelining stages of the sequential forward kernel's chunk loop (prefetches the next chunks' q, k,
# W, U, scores while the state update runs). H100, gated, B1 T32768 H16 D128 forward (benchmarks/sweep_delta_rule.py):
# 1 stage 2.71 ms, 2: 2.10, 3: 1.72-1.74, 4: 1.71, 5: over the 227 KB of shared memory. Above D 128 the buffers
# double: 3 stages at D 256 ask for 288 KB, so wide heads keep 2. The extra stage also costs occupancy, which only
# pays when programs are few: at B8 T4096 H16 (1,024 programs) the delta-rule forward went 1.90 -> 2.49 ms with 3.
# So: FWD_STAGES when the grid has at most FWD_STAGES_MAX_PROGRAMS programs and D <= 128, else FWD_STAGES_WIDE.
FWD_STAGES = 3
FWD_STAGES_WIDE = 2
FWD_STAGES_MAX_PROGRAMS = FEW_PROGRAMS


def _fwd_stages(programs: int, dk: int) -> int:
    return FWD_STAGES if dk <= 128 and programs <= FWD_STAGES_MAX_PROGRAMS else FWD_STAGES_WIDE
BWD_WARPS = 8
USE_PALLAS_WY = True  # False: the forward prepares W, U with XLA's triangular_solve (the previous design)
# The WY kernel also writes the masked, decayed intra-chunk Q K^T that the forward kernel would otherwise recompute
# for every V block (half of its per-chunk matrix work at block_v 16).
PRECOMPUTE_ATTN = True
# How the backward gets W, U and differentiates the WY preparation:
#   "explicit": XLA, T = (I + A)^-1 once per chunk (WY_BWD_INVERSE: "blocked" matmul-only inverse or "solve"), W, U and
#               the matmul-only VJP from it (common.wy_factors_and_vjp);
#   "jax_vjp":  XLA triangular_solve recompute + jax.vjp through it (round 1-3 default; H100 prep backward 12.2 ms);
#   "pallas":   the Pallas WY kernel + Pallas VJP kernel (round 3; slower on the H100: 28.8 ms, register spills).
WY_BWD = "explicit"
WY_BWD_INVERSE = "blocked"
_WY_BWDS = ("explicit", "jax_vjp", "pallas")
# Reverse sweep: the sequential kernel carries dS and writes only du, u' and each chunk's dS (in q's dtype), and a
# kernel parallel over (B, H, chunk, K block) forms dq, dk, dw, dgc with the V blocks looped inside. (Rounds 1-3 wrote
# float32 dq/dk/dw/dgc partials per V block instead, ~6.4 GB of traffic at B1 T32768 H16 D128: removed after the H100
# run of round 4, 29.2 vs 13.3 ms fwd+bwd; benchmarks/NOTES_delta_rule.md.)
DQKW_BLOCK_K = 64  # K block (grid axis) of the dq/dk/dw kernel: keeps its three [C, block_k] float32 accumulators small
DQKW_BLOCK_V = 32  # V block looped over inside it
DQKW_WARPS = 4
BWD_BLOCK_V = None
# Pipelining stages of the reverse sweep's chunk loop and of the dq/dk/dw kernel's loop over V blocks. The sweep that
# did five products per chunk gained nothing from 2-3 (gated fwd+bwd 13.12-13.88 ms vs 13.18 with 1 stage each;
# benchmarks/sweep_delta_rule.py). The two-product sweep is bound by its loads: H100, B1 T32768 H16 D128 fwd+bwd,
# gated 12.41 ms (1 stage) / 12.23 (2) / 11.99 (3), plain 10.80 / 10.61 / 10.37 (RESULTS.md, eighth round). As in the
# forward, the extra stages only where programs are few and D <= 128 (3 stages of D 256 tiles would not fit in shared
# memory): BWD_STAGES there, BWD_STAGES_WIDE otherwise (not measured against 1 at B8 T4096 or D 256).
BWD_STAGES = 3
BWD_STAGES_WIDE = 1
DQKW_STAGES = 1
# The kernel that forms the sweep's dS-independent terms (P = A^T dO, R = Q_dec^T dO - W^T P) before it: V block (grid
# axis) and warps. [K, 64] float32 R tiles with 4 warps; 128 with 8 warps timed the same (12.22 vs 12.23 ms).
SWEEP_LOCAL_BLOCK_V = 64
SWEEP_LOCAL_WARPS = 4


def _sweep_stages(programs: int, dk: int) -> int:
    return BWD_STAGES if dk <= 128 and programs <= FWD_STAGES_MAX_PROGRAMS else BWD_STAGES_WIDE


def _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last):
    """Per-chunk decay factors from the chunk-local cumsum: gc [C], g_last (scalar), Gamma_ij = e^{gc_i-gc_j} (i>=j)."""
    gcv = gc_ref[b, h, ts]
    g_last = jnp.sum(jnp.where(is_last, gcv, 0.0))
    # Mask before exp: above the diagonal gc_i - gc_j > 0 could overflow.
    gamma_mat = jnp.where(causal, jnp.exp(jnp.where(causal, gcv[:, None] - gcv[None, :], 0.0)), 0.0)
    return gcv, g_last, gamma_mat


def _fwd_kernel(*refs, chunk, n_chunks, block_v, scale, gated, has_attn):
    pl = pallas_module()
    refs = list(refs)
    q_ref, k_ref, w_ref, u_ref = refs[:4]
    gc_ref = refs[4] if gated else None
    rest = refs[5:] if gated else refs[4:]
    attn_ref = rest.pop(0) if has_attn else None
    h0_ref, o_ref, ht_ref = rest

    b, h, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(iv * block_v, block_v)
    cdt = q_ref.dtype
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def body(c, s):
        ts = pl.ds(c * chunk, chunk)
        q = q_ref[b, ts, h, :].astype(F32)
        k = k_ref[b, ts, h, :].astype(F32)
        w = w_ref[b, ts, h, :]
        u = u_ref[b, ts, h, vs].astype(F32)
        u_new = u - dot(w, s, cdt)
        if has_attn:  # masked, decayed Q K^T from the WY kernel (once per chunk instead of once per V block)
            attn = attn_ref[b, h, ts, :]
        if gated:
            gcv = gc_ref[b, h, ts]
            g_last = jnp.sum(jnp.where(is_last, gcv, 0.0))
            if not has_attn:
                attn = dot_nt(q, k, cdt) * _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last)[2]
            q_dec = q * jnp.exp(gcv)[:, None]
            k_dec = k * jnp.exp(g_last - gcv)[:, None]
            s_decay = jnp.exp(g_last)
        else:
            if not has_attn:
                attn = jnp.where(causal, dot_nt(q, k, cdt), 0.0)
            q_dec, k_dec, s_decay = q, k, 1.0
        o = (dot(q_dec, s, cdt) + dot(attn, u_new, cdt)) * scale
        o_ref[b, ts, h, vs] = o.astype(o_ref.dtype)
        return s * s_decay + dot_tn(k_dec, u_new, cdt)

    s = lax.fori_loop(0, n_chunks, body, h0_ref[b, h, :, vs].astype(F32))
    ht_ref[b, h, :, vs] = s


def _states_kernel(*refs, chunk, n_chunks, block_v, gated):
    """Each chunk's start state and u', for the backward: the forward's recurrence without its output (no q, no
    scores, no o), so the per-chunk chain is two small products: u' = U - W S, S = e^{g_last} S + (K e^{g_last - gc})^T
    u'. u' is stored in q's dtype (only ever a dot operand)."""
    pl = pallas_module()
    refs = list(refs)
    k_ref, w_ref, u_ref = refs[:3]
    gc_ref = refs[3] if gated else None
    h0_ref, st_ref, un_ref = refs[4:] if gated else refs[3:]

    b, h, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(iv * block_v, block_v)
    cdt = k_ref.dtype
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def body(c, s):
        ts = pl.ds(c * chunk, chunk)
        st_ref[b, h, c, :, vs] = s
        k = k_ref[b, ts, h, :].astype(F32)
        u_new = u_ref[b, ts, h, vs].astype(F32) - dot(w_ref[b, ts, h, :], s, cdt)
        un_ref[b, ts, h, vs] = u_new.astype(un_ref.dtype)
        if gated:
            gcv = gc_ref[b, h, ts]
            g_last = jnp.sum(jnp.where(is_last, gcv, 0.0))
            k, s = k * jnp.exp(g_last - gcv)[:, None], s * jnp.exp(g_last)
        return s + dot_tn(k, u_new, cdt)

    lax.fori_loop(0, n_chunks, body, h0_ref[b, h, :, vs].astype(F32))


def _sweep_local_kernel(*refs, chunk, block_v, scale, gated):
    """The reverse sweep's terms that do not depend on dS, for one chunk and V block, parallel over chunks:
    P = A^T dO (A the masked, decayed scores, dO scaled) and R = (Q e^{gc})^T dO - W^T P. With them the sequential
    sweep's step is dS_prev = e^{g_last} dS + R - W^T (K_dec dS): two small products instead of five."""
    pl = pallas_module()
    refs = list(refs)
    q_ref, w_ref = refs[:2]
    gc_ref = refs[2] if gated else None
    attn_ref, do_ref, p_ref, r_ref = refs[3:] if gated else refs[2:]
    b, h, c, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    ts = pl.ds(c * chunk, chunk)
    vs = pl.ds(iv * block_v, block_v)
    cdt = q_ref.dtype
    do = do_ref[b, ts, h, vs].astype(F32) * scale
    q = q_ref[b, ts, h, :].astype(F32)
    if gated:
        q = q * jnp.exp(gc_ref[b, h, ts])[:, None]
    p = dot_tn(attn_ref[b, h, ts, :], do, cdt)
    p_ref[b, ts, h, vs] = p
    r_ref[b, h, c, :, vs] = dot_tn(q, do, cdt) - dot_tn(w_ref[b, ts, h, :], p, cdt)


def _sweep_kernel(*refs, chunk, n_chunks, block_v, gated):
    """Reverse sweep of the "split" backward: carries dS (the gradient of the chunk's end state) over the chunks in
    reverse, dS_prev = e^{g_last} dS + R - W^T (K_dec dS) with R from _sweep_local_kernel, and writes
    du' = P + K_dec dS, each chunk's dS (q's dtype: only ever used as a dot operand) and e^{g_last} sum(dS * S0) per
    V block on each chunk's last row (the state part of d g_last; a vector store like the other outputs). dq, dk, dw
    and the rest of dgc: _dqkw_kernel."""
    pl = pallas_module()
    refs = list(refs)
    k_ref, w_ref = refs[:2]
    gc_ref, st_ref = (refs[2], refs[3]) if gated else (None, None)
    rest = refs[4:] if gated else refs[2:]
    p_ref, r_ref, dht_ref, du_ref, dst_ref = rest[:5]
    dgs_ref = rest[5] if gated else None
    dh0_ref = rest[-1]

    b, h, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(iv * block_v, block_v)
    cdt = k_ref.dtype
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def body(i, ds):
        c = n_chunks - 1 - i
        ts = pl.ds(c * chunk, chunk)
        k = k_ref[b, ts, h, :].astype(F32)
        if gated:
            gcv = gc_ref[b, h, ts]
            g_last = jnp.sum(jnp.where(is_last, gcv, 0.0))
            k, s_decay = k * jnp.exp(g_last - gcv)[:, None], jnp.exp(g_last)
            # on the chunk's last row
            dgs_ref[iv, b, h, ts] = jnp.where(is_last, s_decay * jnp.sum(ds * st_ref[b, h, c, :, vs]), 0.0)
        else:
            s_decay = 1.0
        kds = dot(k, ds, cdt)
        dst_ref[b, h, c, :, vs] = ds.astype(dst_ref.dtype)
        du_ref[b, ts, h, vs] = p_ref[b, ts, h, vs] + kds
        return ds * s_decay + r_ref[b, h, c, :, vs] - dot_tn(w_ref[b, ts, h, :], kds, cdt)

    ds0 = lax.fori_loop(0, n_chunks, body, dht_ref[b, h, :, vs].astype(F32))
    dh0_ref[b, h, :, vs] = ds0


def _dqkw_kernel(*refs, chunk, n_v, block_v, block_k, scale, gated):
    """dq, dk, dw (and the per-K-block part of dgc) of one chunk and K block, parallel over chunks: loops over the V
    blocks accumulating do S^T, u' dS^T, -du' S^T ([C, block_k]) and do u'^T ([C, C]) on chip, so nothing is written per
    V block. The sums over V blocks are done here, on chip."""
    pl = pallas_module()
    refs = list(refs)
    q_ref, k_ref = refs[:2]
    gc_ref = refs[2] if gated else None
    rest = refs[3:] if gated else refs[2:]
    st_ref, dst_ref, do_ref, un_ref, du_ref, dq_ref, dk_ref, dw_ref = rest[:8]
    dgc_ref = rest[8] if gated else None

    b, h, c, ik = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    ts = pl.ds(c * chunk, chunk)
    ks = pl.ds(ik * block_k, block_k)
    cdt = q_ref.dtype
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def over_v(iv, acc):
        dq_dec, dk_dec, dw, d_attn = acc
        vs = pl.ds(iv * block_v, block_v)
        s = st_ref[b, h, c, ks, vs]
        ds = dst_ref[b, h, c, ks, vs]
        do = do_ref[b, ts, h, vs].astype(F32) * scale
        u_new = un_ref[b, ts, h, vs]
        du_new = du_ref[b, ts, h, vs]
        return (dq_dec + dot_nt(do, s, cdt), dk_dec + dot_nt(u_new, ds, cdt), dw - dot_nt(du_new, s, cdt),
                d_attn + dot_nt(do, u_new, cdt))

    zeros_k = jnp.zeros((chunk, block_k), F32)
    dq_dec, dk_dec, dw, d_attn = lax.fori_loop(0, n_v, over_v, (zeros_k, zeros_k, zeros_k,
                                                                 jnp.zeros((chunk, chunk), F32)))
    q = q_ref[b, ts, h, ks].astype(F32)
    k = k_ref[b, ts, h, ks].astype(F32)
    if gated:
        gcv, g_last, gamma_mat = _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last)
        q_gain, k_gain = jnp.exp(gcv)[:, None], jnp.exp(g_last - gcv)[:, None]
    else:
        gamma_mat = jnp.where(causal, 1.0, 0.0)
        q_gain, k_gain = 1.0, 1.0
    d_attn = d_attn * gamma_mat
    dq_ref[b, ts, h, ks] = dq_dec * q_gain + dot(d_attn, k, cdt)
    dk_ref[b, ts, h, ks] = dot_tn(d_attn, q, cdt) + dk_dec * k_gain
    dw_ref[b, ts, h, ks] = dw
    if gated:
        # This K block's share of dgc (the K sums split over blocks): q.k and the decayed products restricted to it.
        m = d_attn * dot_nt(q, k, cdt)
        r = jnp.sum(dk_dec * k * k_gain, axis=1)
        dgc = jnp.sum(dq_dec * q * q_gain, axis=1) + jnp.sum(m, axis=1) - jnp.sum(m, axis=0) - r
        dgc_ref[ik, b, h, ts] = dgc + jnp.where(is_last, jnp.sum(r), 0.0)


def _pick_block_v(dv: int, block_v):
    if block_v is None:
        block_v = DEFAULT_BLOCK_V if dv % DEFAULT_BLOCK_V == 0 else dv
    if dv % block_v:
        raise ValueError(f"block_v={block_v} must divide the value dimension V={dv} of v")
    return block_v


def _run_forward(q, k, w, u, gc, h0, *, chunk, scale, block_v, interpret, attn=None):
    pl = pallas_module()
    b, t, h, dk = q.shape
    dv = u.shape[-1]
    n = t // chunk
    gated = gc is not None
    out_shape = (jax.ShapeDtypeStruct((b, t, h, dv), u.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), F32))
    kernel = functools.partial(_fwd_kernel, chunk=chunk, n_chunks=n, block_v=block_v, scale=scale, gated=gated,
                               has_attn=attn is not None)
    args = [q, k, w, u] + ([gc] if gated else []) + ([] if attn is None else [attn]) + [h0]
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, dv // block_v), interpret=interpret,
                          compiler_params=triton_params(FWD_WARPS if dk <= 128 else 2 * FWD_WARPS,
                                                        _fwd_stages(b * h * (dv // block_v), dk)),
                          name="delta_rule_fwd")(*args)


def _run_states(k, w, u, gc, h0, *, chunk, block_v, interpret):
    """Each chunk's start state [B, H, N, K, V] float32 and u' [B, T, H, V] in k's dtype (the backward's recompute;
    the forward never stores them)."""
    pl = pallas_module()
    b, t, h, dk = k.shape
    dv = u.shape[-1]
    n = t // chunk
    gated = gc is not None
    kernel = functools.partial(_states_kernel, chunk=chunk, n_chunks=n, block_v=block_v, gated=gated)
    args = [k, w, u] + ([gc] if gated else []) + [h0]
    out_shape = (jax.ShapeDtypeStruct((b, h, n, dk, dv), F32), jax.ShapeDtypeStruct((b, t, h, dv), k.dtype))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, dv // block_v), interpret=interpret,
                          compiler_params=triton_params(FWD_WARPS if dk <= 128 else 2 * FWD_WARPS,
                                                        _fwd_stages(b * h * (dv // block_v), dk)),
                          name="delta_rule_states")(*args)


def _scores_kernel(*refs, chunk, gated):
    """One chunk's masked, decayed scores mask(q_t . k_s e^{gc_t - gc_s}), written as rows [C, C] of [B, H, T, C]."""
    pl = pallas_module()
    q_ref, k_ref = refs[:2]
    gc_ref = refs[2] if gated else None
    attn_ref = refs[-1]
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ts = pl.ds(c * chunk, chunk)
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    scores = dot_nt(q_ref[b, ts, h, :], k_ref[b, ts, h, :], q_ref.dtype)
    if gated:
        is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
        scores = scores * _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last)[2]
    else:
        scores = jnp.where(causal, scores, 0.0)
    attn_ref[b, h, ts, :] = scores.astype(attn_ref.dtype)


def chunk_scores(q, k, gc, *, chunk, interpret):
    """The intra-chunk scores (s <= t, both in t's chunk) as [B, H, T, chunk] in q's dtype, the layout and rounding
    of the WY kernel's `attn` output, for the backward's sweep (which used to recompute them for every V block). A
    kernel parallel over chunks reading q, k [B, T, H, K] in place: XLA's batched product needed layout copies of both
    (~0.3 ms at B1 T32768 H16 on the H100, as much as the sweep saved). T a multiple of chunk; gc [B, H, T] or None."""
    pl = pallas_module()
    b, t, h, _ = q.shape
    gated = gc is not None
    kernel = functools.partial(_scores_kernel, chunk=chunk, gated=gated)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b, h, t, chunk), q.dtype),
                          grid=(b, h, t // chunk), interpret=interpret, compiler_params=triton_params(FWD_WARPS, 1),
                          name="delta_rule_scores")(q, k, *([gc] if gated else []))


def _divisor_block(n: int, want: int) -> int:
    return want if n % want == 0 else n


def _run_backward_split(q, k, w, u_new, gc, attn, states, do, dht, *, chunk, scale, block_v, interpret):
    """The backward's kernels: the dS-independent terms parallel over chunks (grid B, H, chunk, V/SWEEP_LOCAL_BLOCK_V),
    the sequential sweep (grid B, H, V/block_v), then dq/dk/dw/dgc parallel over chunks (grid B, H, chunk,
    K/DQKW_BLOCK_K). -> (dq, dk (direct part), dw, du [B, T, H, *] float32, dgc [B, H, T] float32 or None, dh0 [B, H,
    K, V] float32)."""
    pl = pallas_module()
    b, t, h, dk = q.shape
    dv = u_new.shape[-1]
    n = t // chunk
    nv = dv // block_v
    gated = gc is not None
    cdt = q.dtype
    gates = [gc] if gated else []

    block_local = _divisor_block(dv, SWEEP_LOCAL_BLOCK_V)
    kernel = functools.partial(_sweep_local_kernel, chunk=chunk, block_v=block_local, scale=scale, gated=gated)
    p_term, r_term = pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((b, t, h, dv), F32), jax.ShapeDtypeStruct((b, h, n, dk, dv), F32)),
        grid=(b, h, n, dv // block_local), interpret=interpret, compiler_params=triton_params(SWEEP_LOCAL_WARPS, 1),
        name="delta_rule_bwd_local")(q, w, *gates, attn, do)

    out_shape = [jax.ShapeDtypeStruct((b, t, h, dv), F32), jax.ShapeDtypeStruct((b, h, n, dk, dv), cdt)]
    if gated:
        out_shape.append(jax.ShapeDtypeStruct((nv, b, h, t), F32))
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
    kernel = functools.partial(_sweep_kernel, chunk=chunk, n_chunks=n, block_v=block_v, gated=gated)
    args = [k, w] + ([gc, states] if gated else []) + [p_term, r_term, dht]
    outs = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=(b, h, nv), interpret=interpret,
                          compiler_params=triton_params(BWD_WARPS, _sweep_stages(b * h * nv, dk)),
                          name="delta_rule_bwd_sweep")(*args)
    du, dstates = outs[:2]
    dh0 = outs[-1]

    block_k = _divisor_block(dk, DQKW_BLOCK_K)
    bv = _divisor_block(dv, DQKW_BLOCK_V)
    nk = dk // block_k
    out_shape = [jax.ShapeDtypeStruct((b, t, h, dk), F32)] * 3
    if gated:
        out_shape.append(jax.ShapeDtypeStruct((nk, b, h, t), F32))
    kernel = functools.partial(_dqkw_kernel, chunk=chunk, n_v=dv // bv, block_v=bv, block_k=block_k, scale=scale,
                               gated=gated)
    args = [q, k] + ([gc] if gated else []) + [states, dstates, do, u_new, du]
    outs2 = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=(b, h, n, nk), interpret=interpret,
                           compiler_params=triton_params(DQKW_WARPS, DQKW_STAGES), name="delta_rule_bwd_dqkw")(*args)
    dq, dk_, dw = outs2[:3]
    dgc = None
    if gated:
        dgc = outs2[3].sum(0) + outs[2].sum(0)  # K-block parts + the state part of d g_last (per V block)
    return dq, dk_, dw, du, dgc, dh0


def _prepare(k, v, g, beta, chunk, pallas_interpret=None, q=None):
    """Padded chunk-local cumsum and WY factors. Returns (w, u, gc) on the padded time axis.

    pallas_interpret=None: the differentiable XLA version (the backward's jax.vjp and the reference); True/False: the
    Pallas WY kernel (forward only) in interpret/compiled mode; with q (padded) given it returns ((w, u, gc), attn).
    """
    k, _ = pad_time(k, chunk)
    v, _ = pad_time(v, chunk)
    beta, _ = pad_time(beta, chunk)  # beta = 0 on padding: padded tokens write nothing
    gc = None
    if g is not None:
        g, _ = pad_time(g, chunk)  # g = 0 on padding: no decay
        gc = chunk_cumsum(g, chunk)
    if pallas_interpret is None:
        w, u = wy_factors(k, v, beta, gc, chunk)
    elif q is not None:
        w, u, attn = wy_factors_pallas(k, v, beta, gc, chunk, interpret=pallas_interpret, q=q)
        return (w, u, gc), attn
    else:
        w, u = wy_factors_pallas(k, v, beta, gc, chunk, interpret=pallas_interpret)
    return w, u, gc


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _delta_rule_core(q, k, v, g, beta, h0, chunk, scale, block_v, interpret):
    o, ht, _ = _core_fwd(q, k, v, g, beta, h0, chunk, scale, block_v, interpret)
    return o, ht


def _core_fwd(q, k, v, g, beta, h0, chunk, scale, block_v, interpret):
    t = q.shape[1]
    qp, _ = pad_time(q, chunk)
    kp, _ = pad_time(k, chunk)
    attn = None
    if not USE_PALLAS_WY:
        w, u, gc = _prepare(k, v, g, beta, chunk)
    elif PRECOMPUTE_ATTN:
        (w, u, gc), attn = _prepare(k, v, g, beta, chunk, pallas_interpret=interpret, q=qp)
    else:
        w, u, gc = _prepare(k, v, g, beta, chunk, pallas_interpret=interpret)
    o, ht = _run_forward(qp, kp, w, u, gc, h0, chunk=chunk, scale=scale, block_v=block_v, interpret=interpret,
                         attn=attn)
    return o[:, :t], ht, (q, k, v, g, beta, h0)


def _core_vjp_fwd(q, k, v, g, beta, h0, chunk, scale, block_v, interpret):
    o, ht, res = _core_fwd(q, k, v, g, beta, h0, chunk, scale, block_v, interpret)
    return (o, ht), res


def _core_vjp_bwd(chunk, scale, block_v, interpret, res, cts):
    q, k, v, g, beta, h0 = res
    do, dht = cts
    t = q.shape[1]
    if WY_BWD not in _WY_BWDS:
        raise ValueError(f"WY_BWD must be one of {_WY_BWDS}, got {WY_BWD!r}")
    kp, _ = pad_time(k, chunk)
    if WY_BWD == "jax_vjp":
        (w, u, gc), prep_vjp = jax.vjp(lambda k_, v_, g_, b_: _prepare(k_, v_, g_, b_, chunk), k, v, g, beta)
    else:
        vp, _ = pad_time(v, chunk)
        betap, _ = pad_time(beta, chunk)  # beta = 0 on padding: padded tokens write nothing
        gc, cumsum_vjp = None, None
        if g is not None:  # g = 0 on padding: no decay
            gc, cumsum_vjp = jax.vjp(lambda g_: chunk_cumsum(pad_time(g_, chunk)[0], chunk), g)
        if WY_BWD == "pallas":
            w, u = wy_factors_pallas(kp, vp, betap, gc, chunk, interpret=interpret)
        else:
            w, u, explicit_vjp = wy_factors_and_vjp(kp, vp, betap, gc, chunk, inverse=WY_BWD_INVERSE)
    qp, _ = pad_time(q, chunk)
    dop, _ = pad_time(do.astype(v.dtype), chunk)
    block_v = block_v if BWD_BLOCK_V is None else _pick_block_v(v.shape[-1], BWD_BLOCK_V)
    # Recompute each chunk's start state (written to HBM only in the backward, where the reverse sweep needs it).
    states, u_new = _run_states(kp, w, u, gc, h0, chunk=chunk, block_v=block_v, interpret=interpret)
    attn = chunk_scores(qp, kp, gc, chunk=chunk, interpret=interpret)
    dq, dk_direct, dw, du, dgc, dh0 = _run_backward_split(qp, kp, w, u_new, gc, attn, states, dop, dht.astype(F32),
                                                          chunk=chunk, scale=scale, block_v=block_v,
                                                          interpret=interpret)
    if WY_BWD == "jax_vjp":
        dk_prep, dv, dg, dbeta = prep_vjp((dw.astype(w.dtype), du.astype(u.dtype), dgc))
    else:
        if WY_BWD == "pallas":
            dk_prep, dv, dbeta, dgc_prep = wy_factors_vjp_pallas(kp, vp, betap, gc, dw, du, chunk,
                                                                 interpret=interpret)
        else:
            dk_prep, dv, dbeta, dgc_prep = explicit_vjp(dw, du)
        dv, dbeta = dv[:, :t], dbeta[:, :t]
        dg = None if g is None else cumsum_vjp(dgc + dgc_prep)[0]
    dq = dq[:, :t].astype(q.dtype)
    dk = (dk_direct[:, :t] + dk_prep[:, :t].astype(F32)).astype(k.dtype)
    dg = None if g is None else dg.astype(g.dtype)
    return dq, dk, dv.astype(v.dtype), dg, dbeta.astype(beta.dtype), dh0.astype(h0.dtype)


_delta_rule_core.defvjp(_core_vjp_fwd, _core_vjp_bwd)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                     interpret=None, block_v=None):
    """Chunked gated delta rule (Pallas), differentiable in every input.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log decay (<= 0) or None (plain delta rule); beta: [B, T, H];
    initial_state: [B, H, K, V] float32 or None (zeros). q and k are used as given (l2norm is the caller's job).
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32 or None).
    `interpret=None` runs in interpret mode where there is no GPU/TPU; `block_v` splits V across programs.
    """
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("beta", beta, 3)):
        check_rank(name, x, rank)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (b, t, h):
        raise ValueError(f"v must have shape [B, T, H, V] = [{b}, {t}, {h}, V], got {tuple(v.shape)}")
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must have shape {(b, t, h)}, got {tuple(beta.shape)}")
    if g is not None and g.shape != (b, t, h):
        raise ValueError(f"g must have shape {(b, t, h)}, got {tuple(g.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ValueError(f"initial_state must have shape {(b, h, dk, dv)}, got {tuple(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")
    scale = float(dk ** -0.5) if scale is None else float(scale)
    block_v = _pick_block_v(dv, block_v)
    h0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    o, ht = _delta_rule_core(q, k, v, g, beta, h0, int(chunk_size), scale, block_v, bool(interpret))
    return o, (ht if output_final_state else None)


def delta_rule(q, k, v, beta, **kwargs):
    """Plain (ungated) delta rule: gated_delta_rule with g = None."""
    return gated_delta_rule(q, k, v, None, beta, **kwargs)


def gated_delta_rule_impl(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=64):
    """Adapter for ahn_jax.ops dispatch (impl="pallas"): the op's calling convention, final state always returned."""
    return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True,
                            chunk_size=chunk_size)


def delta_rule_impl(q, k, v, beta, *, scale, initial_state=None, chunk_size=64):
    """Adapter for ahn_jax.ops dispatch (impl="pallas") of the plain delta rule."""
    return gated_delta_rule_impl(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                                 chunk_size=chunk_size)
