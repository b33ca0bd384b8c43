"""Sliding-window + sink flash attention in Pallas, forward and backward (jax.custom_vjp).

A query at position t sees the key j iff  j <= t  and  (t - j < window  or  j < sinks)  (the predicate of
ahn_jax.ops.window.attention_visible, restated in `_visible` because pallas_kernels may not import ahn_jax).

Cost is O(T * (window + sinks)): every key loop visits only the blocks that hold visible keys.
  forward / dq   grid (B, Hq, nQ): for query block i, the sink blocks [0, min(nsb, lo)) then the window blocks [lo, hi).
  dk / dv        grid (B, Hkv, nK + nsb * n_split): program j < nK owns key block j and walks the query blocks whose
                 window reaches it, over the `group` query heads of its KV head (GQA without repeating K/V). Sink key
                 blocks are seen by *every* later query, so their tail of query blocks [q_tail, nQ) is cut into
                 `n_split` chunks handled by extra programs (j >= nK) that write partial sums into extra rows of the
                 output; the wrapper adds them back. No program walks more than ~(window + block)/block_q query blocks,
                 so the sinks do not create one long straggler program.
  dq             dq_mode="kernel": its own kernel over the forward's grid (recomputes q k^T and dO v^T: 7 backward
                 matmuls); dq_mode="atomic": the dk/dv programs add ds k into a zeroed float32 dq with atomic adds
                 (5 matmuls, at the price of float32 atomic traffic of D*4/block_k bytes per score).
Numerics: bf16 (or f32) in, float32 scores/accumulators, online softmax, exact log-sum-exp (natural log).
Sequence lengths that are not a multiple of the block are zero-padded; padded keys lie after every real query and
are removed by causality, padded queries are sliced off (their cotangents are zero, so they add nothing to dk/dv).

GPU lowering: Pallas Triton, chosen by passing its CompilerParams (jax 0.10 and 0.11 both select the backend from the
type of `compiler_params`; 0.11 deprecates but still ships it). On CPU the same kernel bodies run in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_NEG_INF = float("-inf")


def _visible(q_pos, k_pos, window, sinks):
    """May query q_pos attend key k_pos? Same predicate as ahn_jax.ops.window.attention_visible."""
    return (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < sinks))


@dataclasses.dataclass(frozen=True)
class _Config:
    window: int
    sinks: int
    scale: float
    seq_len: int  # real T
    padded_len: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    block_q_dq: int  # tiles of the separate dq kernel (dq_mode="kernel")
    block_k_dq: int
    num_warps: int | None
    num_warps_bwd: int | None
    num_warps_dq: int | None
    num_stages: int | None
    num_stages_bwd: int | None
    num_stages_dq: int | None
    dq_mode: str  # "kernel": dq in its own kernel; "atomic": dq accumulated by the dk/dv kernel with atomic adds
    lazy_rescale: bool  # forward: rescale the accumulator only when a row max grows by more than _RESCALE_SLACK
    forward: str  # "triton": _fwd_kernel; "mosaic": swa_attention_mgpu (Hopper wgmma, warp-specialised)
    backward: str  # "triton": _dq_kernel + _dkdv_kernel; "mosaic": swa_attention_mgpu.backward
    mosaic_switches: tuple  # ((MgpuBwdConfig field, value), ...): the Mosaic backward's module switches
    persistent_ctas: int  # Mosaic forward: CTAs of its persistent grid (0: one per tile), from its module switch
    q_buffers: int  # Mosaic forward: Q/O buffers per warpgroup (2: next tile's Q prefetched), from its module switch
    interpret: bool


def _dot(a, b, contract_a, contract_b):
    """Float32-accumulating 2-D matmul contracting a's dim `contract_a` with b's dim `contract_b`."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _compiler_params(cfg: _Config, num_warps, num_stages):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton  # lazy: pulls the GPU backend

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _query_range_of_key_block(kb, cfg, block_q, block_k, num_q_blocks):
    """Query blocks [lo, hi) whose window reaches key block kb (sink key blocks: up to the static tail start)."""
    lo = lax.div(kb * block_k, block_q)
    last_window_query = (kb + 1) * block_k - 2 + cfg.window  # last query seeing the block's last key by the window
    hi = jnp.minimum(num_q_blocks, lax.div(last_window_query, block_q) + 1)
    q_tail = _sink_tail_start(cfg, block_q, block_k, num_q_blocks)
    num_sink_blocks = _num_sink_blocks(cfg, block_k)
    return lo, jnp.where(kb < num_sink_blocks, q_tail, hi)


def _num_sink_blocks(cfg, block_k):
    return -(-cfg.sinks // block_k)


def _sink_tail_start(cfg, block_q, block_k, num_q_blocks):
    """First query block that sees the sink blocks only through the sink rule (static)."""
    nsb = _num_sink_blocks(cfg, block_k)
    if nsb == 0:
        return num_q_blocks
    return min(num_q_blocks, (nsb * block_k - 2 + cfg.window) // block_q + 1)


# ----------------------------------------------------------------------------------------------------------- forward

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _key_block_ranges(q_start, cfg, block_q, block_k):
    """Key blocks a query block visits, as disjoint ranges with a static flag "needs the mask".

    Sinks [0, sink_hi) are always masked (they are few). The window [win_lo, win_hi) splits into its masked left edge
    [win_lo, full_lo), fully visible middle [full_lo, full_hi) (causal for every pair and inside every query's window),
    and masked diagonal [full_hi, win_hi). Skipping the mask in the middle saves elementwise work per score.
    """
    win_lo = lax.div(jnp.maximum(q_start - cfg.window + 1, 0), block_k)
    win_hi = lax.div(q_start + block_q - 1, block_k) + 1
    sink_hi = jnp.minimum(_num_sink_blocks(cfg, block_k), win_lo)
    # Window-full: the last query's window reaches the block's first key: k_start >= q_start + block_q - window.
    full_lo = _clamp(lax.div(jnp.maximum(q_start + block_q - cfg.window, 0) + block_k - 1, block_k), win_lo, win_hi)
    # Causal-full: the block's last key is <= the first query: k_start + block_k <= q_start + 1.
    full_hi = _clamp(lax.div(q_start + 1, block_k), full_lo, win_hi)
    return ((0, sink_hi, True), (win_lo, full_lo, True), (full_lo, full_hi, False), (full_hi, win_hi, True))


# Lazy rescaling: the running max m only moves when some row's block max exceeds it by more than this many log2
# units, so most blocks skip the [bq, D] accumulator rescale. Exact: o = acc / l and lse = m + log2(l) hold for any
# reference m; p = exp2(s - m) stays <= 2**_RESCALE_SLACK, far from float32/bf16 overflow.
_RESCALE_SLACK = 8.0


def _lazy_update(s, v, m, l, acc):
    """One online-softmax step with a stale reference max. s [bq, bk] log2-unit scores (-inf = masked), v [bk, D]."""
    row_max = jnp.max(s, axis=1)
    # Block-uniform decision (one branch for the whole tile); rows still at -inf with a finite score force it.
    need = jnp.max(jnp.where(row_max > m + _RESCALE_SLACK, 1.0, 0.0)) > 0.0

    def rescale(carry):
        m, l, acc = carry
        m_new = jnp.maximum(m, row_max)
        alpha = jnp.exp2(m - jnp.where(m_new == _NEG_INF, 0.0, m_new))
        return m_new, l * alpha, acc * alpha[:, None]

    m, l, acc = lax.cond(need, rescale, lambda carry: carry, (m, l, acc))
    p = jnp.exp2(s - jnp.where(m == _NEG_INF, 0.0, m)[:, None])  # rows still at -inf have only -inf scores: p = 0
    return m, l + jnp.sum(p, axis=1), acc + _dot(p.astype(v.dtype), v, 1, 0)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    q_start = pl_program_id(2) * bq
    q = q_ref[...]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    scale2 = cfg.scale * _LOG2E  # scores in log2 units: exp2 is the hardware's native exponential

    def visit(kb, carry, masked):
        m, l, acc = carry
        k_start = kb * bk
        k = k_ref[pl_ds(k_start, bk), :]
        v = v_ref[pl_ds(k_start, bk), :]
        s = _dot(q, k, 1, 1) * scale2
        if masked:
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            s = jnp.where(_visible(q_pos, k_pos, cfg.window, cfg.sinks), s, _NEG_INF)
        if cfg.lazy_rescale:
            return _lazy_update(s, v, m, l, acc)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_shift = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        p = jnp.exp2(s - m_shift[:, None])
        alpha = jnp.exp2(m - m_shift)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
        return m_new, l, acc

    d = q.shape[-1]
    carry = (jnp.full((bq,), _NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    for lo, hi, masked in _key_block_ranges(q_start, cfg, bq, bk):
        carry = lax.fori_loop(lo, hi, functools.partial(visit, masked=masked), carry)
    m, l, acc = carry
    # Every row sees at least its own key (window >= 1), padded rows included, so l > 0.
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) * _LN2


def _forward(q, k, v, cfg: _Config):
    """Padded q [B,Tp,Hq,D], k/v [B,Tp,Hkv,D] -> (o [B,Tp,Hq,D], lse [B,Hq,Tp] float32)."""
    if cfg.forward == "mosaic":
        from pallas_kernels import swa_attention_mgpu as mgpu

        return mgpu.forward(q, k, v, mgpu.MgpuConfig(window=cfg.window, sinks=cfg.sinks, scale=cfg.scale,
                                                    block_kv=cfg.block_k, stages=cfg.num_stages,
                                                    persistent_ctas=cfg.persistent_ctas, q_buffers=cfg.q_buffers,
                                                    interpret=cfg.interpret))
    pl = _pallas()
    b, tp, hq, d = q.shape
    group = hq // k.shape[2]
    bq = cfg.block_q
    grid = (b, hq, tp // bq)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0))
    kv_spec = pl.BlockSpec((None, tp, None, d), lambda bi, h, i: (bi, 0, lax.div(h, group), 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda bi, h, i: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, cfg.num_warps, cfg.num_stages),
        name="swa_attention_fwd",
    )(q, k, v)


# ---------------------------------------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    q_start = pl_program_id(2) * bq
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * _LOG2E
    delta = delta_ref[...]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    scale2 = cfg.scale * _LOG2E

    def visit(kb, dq, masked):
        k_start = kb * bk
        k = k_ref[pl_ds(k_start, bk), :]
        v = v_ref[pl_ds(k_start, bk), :]
        p = jnp.exp2(_dot(q, k, 1, 1) * scale2 - lse2[:, None])
        if masked:
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            p = jnp.where(_visible(q_pos, k_pos, cfg.window, cfg.sinks), p, 0.0)
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = jnp.zeros(q.shape, jnp.float32)
    for lo, hi, masked in _key_block_ranges(q_start, cfg, bq, bk):
        dq = lax.fori_loop(lo, hi, functools.partial(visit, masked=masked), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, group: int,
                 num_k_blocks: int, n_split: int, split_len: int):
    # Scores are formed transposed (keys x queries) so dk = ds^T q and dv = p^T do need no register transposes.
    # dq_mode "atomic": refs = (dq_in, dk, dv, dq) where dq (aliased to the zeroed float32 dq_in) [Tp, Hq, D] receives
    # ds k for every visited (key block, query block) pair by atomic adds: every visible pair is visited by exactly one
    # program, so the sums are complete, and the separate dq kernel's recomputation of q k^T and dO v^T is saved.
    fuse_dq = cfg.dq_mode == "atomic"
    if fuse_dq:
        _, dk_ref, dv_ref, dq_ref = refs
    else:
        dk_ref, dv_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    num_q_blocks = cfg.padded_len // bq
    hkv = pl_program_id(1)
    j = pl_program_id(2)
    is_tail = j >= num_k_blocks
    tail = jnp.maximum(j - num_k_blocks, 0)
    kb = jnp.where(is_tail, lax.div(tail, max(n_split, 1)), j)
    lo, hi = _query_range_of_key_block(kb, cfg, bq, bk, num_q_blocks)
    q_tail = _sink_tail_start(cfg, bq, bk, num_q_blocks)
    split_lo = q_tail + lax.rem(tail, max(n_split, 1)) * split_len
    lo = jnp.where(is_tail, split_lo, lo)
    hi = jnp.where(is_tail, jnp.minimum(split_lo + split_len, num_q_blocks), hi)
    k_start = kb * bk
    # Fully visible query blocks [full_lo, full_hi): causal for the block's last key, and inside the window of the
    # block's first key for every query (or the whole key block is sinks, seen by every later query).
    full_lo = _clamp(lax.div(k_start + bk - 1 + bq - 1, bq), lo, hi)
    window_full_hi = lax.div(k_start + cfg.window, bq)
    full_hi = _clamp(jnp.where(k_start + bk <= cfg.sinks, num_q_blocks, window_full_hi), full_lo, hi)

    k = k_ref[pl_ds(k_start, bk), :]
    v = v_ref[pl_ds(k_start, bk), :]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    scale2 = cfg.scale * _LOG2E

    def visit_head(g, carry):
        h = hkv * group + g

        def visit(qb, carry, masked):
            dk, dv = carry
            q_start = qb * bq
            q = q_ref[pl_ds(q_start, bq), h, :]
            do = do_ref[pl_ds(q_start, bq), h, :]
            lse2 = lse_ref[h, pl_ds(q_start, bq)] * _LOG2E
            delta = delta_ref[h, pl_ds(q_start, bq)]
            p_t = jnp.exp2(_dot(k, q, 1, 1) * scale2 - lse2[None, :])  # [bk, bq]
            if masked:
                q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
                p_t = jnp.where(_visible(q_pos, k_pos, cfg.window, cfg.sinks), p_t, 0.0)
            dv = dv + _dot(p_t.astype(do.dtype), do, 1, 0)
            ds_t = (p_t * (_dot(v, do, 1, 1) - delta[None, :])).astype(q.dtype)
            dk = dk + _dot(ds_t, q, 1, 0)
            if fuse_dq:  # unscaled: the wrapper multiplies by the score scale when it casts
                _atomic_add(dq_ref, (pl_ds(q_start, bq), h, slice(None)), _dot(ds_t, k, 0, 0))
            return dk, dv

        for a, b, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
            carry = lax.fori_loop(a, b, functools.partial(visit, masked=masked), carry)
        return carry

    d = k.shape[-1]
    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(0, group, visit_head, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _backward(q, k, v, o, lse, do, dlse, cfg: _Config):
    """Padded tensors in, (dq, dk, dv) padded out, in the input dtypes."""
    if cfg.backward == "mosaic":
        from pallas_kernels import swa_attention_mgpu as mgpu

        return mgpu.backward(q, k, v, o, lse, do, dlse, mgpu.MgpuBwdConfig(
            window=cfg.window, sinks=cfg.sinks, scale=cfg.scale, block_kv_dq=cfg.block_k_dq,
            stages_dq=cfg.num_stages_dq, block_q_dkv=cfg.block_q_bwd, stages_dkv=cfg.num_stages_bwd,
            interpret=cfg.interpret, **dict(cfg.mosaic_switches)))
    pl = _pallas()
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    # delta_i = sum_d dO*O - dlse_i: the lse cotangent enters the softmax gradient as a per-row shift.
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    kv_full = pl.BlockSpec((None, tp, None, d), lambda bi, h, i: (bi, 0, lax.div(h, group), 0))
    if cfg.dq_mode == "kernel":
        bqd = cfg.block_q_dq
        row_spec_dq = pl.BlockSpec((None, None, bqd), lambda bi, h, i: (bi, h, i))
        q_spec_dq = pl.BlockSpec((None, bqd, None, d), lambda bi, h, i: (bi, i, h, 0))
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg),
            grid=(b, hq, tp // bqd),
            in_specs=[q_spec_dq, kv_full, kv_full, q_spec_dq, row_spec_dq, row_spec_dq],
            out_specs=q_spec_dq,
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            interpret=cfg.interpret,
            compiler_params=_compiler_params(cfg, cfg.num_warps_dq, cfg.num_stages_dq),
            name="swa_attention_dq",
        )(q, k, v, do, lse, delta)

    num_q_blocks, num_k_blocks = tp // bq, tp // bk
    nsb = _num_sink_blocks(cfg, bk)
    q_tail = _sink_tail_start(cfg, bq, bk, num_q_blocks)
    # Chunk the sink blocks' tail of queries like a window's worth of work per program.
    split_len = max(1, -(-(cfg.window + bk) // bq))
    n_split = -(-(num_q_blocks - q_tail) // split_len) if nsb else 0
    n_extra = nsb * n_split
    rows = tp + n_extra * bk
    qfull = pl.BlockSpec((None, tp, hq, d), lambda bi, h, j: (bi, 0, 0, 0))
    kvh_full = pl.BlockSpec((None, tp, None, d), lambda bi, h, j: (bi, 0, h, 0))
    rows_full = pl.BlockSpec((None, hq, tp), lambda bi, h, j: (bi, 0, 0))
    out_spec = pl.BlockSpec((None, bk, None, d), lambda bi, h, j: (bi, j, h, 0))
    in_specs = [qfull, kvh_full, kvh_full, qfull, rows_full, rows_full]
    out_specs = [out_spec, out_spec]
    out_shape = [jax.ShapeDtypeStruct((b, rows, hkv, d), jnp.float32)] * 2
    operands = [q, k, v, do, lse, delta]
    aliases = {}
    if cfg.dq_mode == "atomic":
        in_specs.append(qfull)
        out_specs.append(qfull)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
        operands.append(jnp.zeros(q.shape, jnp.float32))
        aliases = {len(operands) - 1: 2}
    outs = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, group=group, num_k_blocks=num_k_blocks, n_split=n_split,
                          split_len=split_len),
        grid=(b, hkv, num_k_blocks + n_extra),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, cfg.num_warps_bwd, cfg.num_stages_bwd),
        name="swa_attention_dkdv_dq" if aliases else "swa_attention_dkdv",
    )(*operands)
    dk_all, dv_all = outs[0], outs[1]
    if cfg.dq_mode == "atomic":
        dq = (outs[2] * cfg.scale).astype(q.dtype)

    def fold(x_all):
        x = x_all[:, :tp]
        if n_extra:
            extra = x_all[:, tp:].reshape(b, nsb, n_split, bk, hkv, d).sum(axis=2).reshape(b, nsb * bk, hkv, d)
            x = x.at[:, : nsb * bk].add(extra)
        return x

    return dq, fold(dk_all).astype(k.dtype), fold(dv_all).astype(v.dtype)


# ------------------------------------------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swa_padded(q, k, v, cfg):
    return _forward(q, k, v, cfg)


def _swa_padded_fwd(q, k, v, cfg):
    o, lse = _forward(q, k, v, cfg)
    return (o, lse), (q, k, v, o, lse)


def _swa_padded_bwd(cfg, res, cotangents):
    q, k, v, o, lse = res
    do, dlse = cotangents
    return _backward(q, k, v, o, lse, do.astype(q.dtype), dlse.astype(jnp.float32), cfg)


_swa_padded.defvjp(_swa_padded_fwd, _swa_padded_bwd)


def _pallas():
    from jax.experimental import pallas as pl  # lazy: importing Pallas is slow

    return pl


def pl_program_id(axis):
    return _pallas().program_id(axis)


def pl_ds(start, size):
    return _pallas().ds(start, size)


def _atomic_add(ref, idx, value):
    # Lives in the Triton Pallas module on jax 0.10 and 0.11; interpret mode runs it through its discharge rule.
    from jax.experimental.pallas import triton as pl_triton  # lazy: pulls the GPU backend

    pl_triton.atomic_add(ref, idx, value)


def _default_blocks(d):
    """(block_q, block_k, block_q_bwd, block_k_bwd, warps, warps_bwd, stages, stages_bwd) by head_dim.

    D <= 128: the best of the tile sweep on an H100 (benchmarks/NOTES_swa.md); D = 256: smaller tiles so the
    float32 accumulators fit in registers, not measured.
    """
    if d <= 128:
        return 64, 64, 64, 64, 4, 4, 3, 2
    return 64, 32, 32, 32, 8, 8, 2, 2


def _resolve_auto(forward, backward, q, k, interpret, dq_mode, lazy_rescale, block_k, block_q_bwd, block_k_dq):
    """"auto" -> "mosaic" where the Mosaic kernels run and were measured faster (Hopper GPUs: benchmarks/RESULTS.md,
    1.2-1.5x the Triton forward, 1.2-1.3x its forward+backward on an H100), else "triton"."""
    if "auto" not in (forward, backward):
        return forward, backward
    from pallas_kernels import swa_attention_mgpu as mgpu

    hopper = not interpret and mgpu.hopper_gpu()
    fwd_ok = hopper and not lazy_rescale and mgpu.supported(q, k, block_k or mgpu.DEFAULT_BLOCK_KV) is None
    bwd_ok = hopper and dq_mode == "kernel" and mgpu.supported(q, k, block_q_bwd or 64) is None and \
        mgpu.supported(q, k, block_k_dq or 64) is None
    if forward == "auto":
        forward = "mosaic" if fwd_ok else "triton"
    if backward == "auto":
        backward = "mosaic" if bwd_ok else "triton"
    return forward, backward


def _persistent_ctas(forward, window, interpret):
    """CTAs of the Mosaic forward's persistent grid (0: one CTA per tile), per swa_attention_mgpu.FORWARD_PERSISTENT."""
    if forward != "mosaic":
        return 0
    from pallas_kernels import swa_attention_mgpu as mgpu

    persistent = mgpu.FORWARD_PERSISTENT
    if persistent == "auto":
        persistent = window <= mgpu.PERSISTENT_MAX_WINDOW
    if not persistent:
        return 0
    return 2 if interpret else mgpu.sm_count()  # interpret mode: two CTAs share the tiles


def _mosaic_switches(backward, d, block_q_bwd, interpret, window):
    """The Mosaic backward's module switches as (MgpuBwdConfig field, value) pairs (hashable, for the static
    config); none for the Triton backward."""
    if backward != "mosaic":
        return ()
    from pallas_kernels import swa_attention_mgpu as mgpu

    fused = mgpu.BWD_FUSED_DQ
    if fused == "auto":
        fused = mgpu.fused_dq_supported(d, block_q_bwd, interpret)
    split = mgpu.BWD_DKV_SPLIT
    if split == "auto":
        split = mgpu.auto_dkv_split(window)
    return (("schedule_dq", mgpu.BWD_SCHEDULE_DQ), ("schedule_dkv", mgpu.BWD_SCHEDULE_DKV),
            ("paired_dkv", mgpu.BWD_PAIRED_DKV), ("fused_dq", bool(fused)), ("dkv_registers", mgpu.BWD_DKV_REGISTERS),
            ("dkv_split", int(split)))


def _check_block(name, value):
    if value < 1 or value & (value - 1):
        raise ValueError(f"swa_attention: {name}={value} must be a positive power of two")


def swa_attention(q, k, v, *, window: int, sinks: int = 0, scale: float | None = None, return_lse: bool = False,
                  block_q: int | None = None, block_k: int | None = None, block_q_bwd: int | None = None,
                  block_k_bwd: int | None = None, block_q_dq: int | None = None, block_k_dq: int | None = None,
                  num_warps: int | None = None, num_warps_bwd: int | None = None, num_warps_dq: int | None = None,
                  num_stages: int | None = None, num_stages_bwd: int | None = None, num_stages_dq: int | None = None,
                  dq_mode: str = "kernel", lazy_rescale: bool = False, forward: str = "auto",
                  backward: str = "auto", interpret: bool | None = None):
    """Sliding-window + sink attention: query t sees keys j <= t with t - j < window or j < sinks.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv)).
        bf16 or float32; D a multiple of 16 (64 / 128 / 256 are the intended head sizes).
      window: static int >= 1 (the pure window, not counting sinks). sinks: static int >= 0.
      scale: score scale, default D ** -0.5.
      return_lse: also return the natural-log log-sum-exp of the visible scaled scores, [B, T, Hq] float32
        (differentiable, for merging with another attention part).
      block_*: tile sizes (powers of two) for the forward, dk/dv (`_bwd`) and dq (`_dq`, used with dq_mode="kernel")
        kernels; None picks defaults by D, clamped to T; the dq tiles default to the dk/dv tiles.
      num_warps*, num_stages*: Triton launch settings (GPU only) for the forward / dk/dv / dq kernels; None: defaults.
      dq_mode: "kernel" (dq in its own kernel, which recomputes q k^T and dO v^T: 7 backward matmuls) or "atomic"
        (the dk/dv kernel also forms ds k and adds it into a float32 dq buffer with atomic adds: 5 matmuls).
      lazy_rescale: forward only rescales its accumulator when a row max grows by more than 2**8 (exact result).
      forward: "auto" (default: "mosaic" on a Hopper GPU for the operands it supports and without lazy_rescale,
        else "triton"), "triton" (the Pallas Triton kernel) or "mosaic" (pallas_kernels.swa_attention_mgpu: Hopper
        wgmma with TMA and warp specialisation; bf16/f16, D 64 or 128; block_k is its key tile (64 or 128, default
        128), num_stages its K/V ring depth (default 2); block_q and num_warps do not apply: 128 query rows per CTA).
      backward: "auto" (as forward, and only with dq_mode "kernel"), "triton" or "mosaic"
        (swa_attention_mgpu.backward: a dq kernel and a dk/dv kernel in the same style; same constraints; block_k_dq
        is the dq kernel's key tile, block_q_bwd the dk/dv kernel's query tile, 64 or 128, default 64;
        num_stages_dq / num_stages_bwd their ring depths, default 3; dq_mode must be "kernel").
      interpret: run the Pallas kernels in interpret mode; None means "on CPU".
    Timed on a GPU (H100) at D = 128 only; the Mosaic kernels were also checked there at D = 64; other head sizes
    are tested in interpret mode, their GPU tiles untimed.
    Returns:
      o [B, T, Hq, D] in q's dtype, or (o, lse) with return_lse.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"swa_attention: {name} must be [B, T, H, D], got shape {x.shape}")
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"swa_attention: k {k.shape} and v {v.shape} must be [B, T, Hkv, D] matching q {q.shape}")
    if hq % k.shape[2]:
        raise ValueError(f"swa_attention: q heads {hq} not a multiple of kv heads {k.shape[2]}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"swa_attention: window must be a static int >= 1, got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"swa_attention: sinks must be a static int >= 0, got {sinks!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    forward, backward = _resolve_auto(forward, backward, q, k, interpret, dq_mode, lazy_rescale, block_k,
                                      block_q_bwd, block_k_dq)
    dq_, dk_, dqb, dkb, warps, warps_bwd, stages, stages_bwd = _default_blocks(d)
    if forward == "mosaic":
        from pallas_kernels import swa_attention_mgpu as mgpu

        dk_, stages = mgpu.DEFAULT_BLOCK_KV, mgpu.DEFAULT_STAGES
        why = mgpu.supported(q, k, block_k or dk_)
        if why:
            raise ValueError(f"swa_attention: forward='mosaic' does not support {why}")
    elif forward != "triton":
        raise ValueError(f"swa_attention: forward must be 'triton' or 'mosaic', got {forward!r}")
    if backward == "mosaic":
        from pallas_kernels import swa_attention_mgpu as mgpu

        dqb, dkb = mgpu.MgpuBwdConfig.block_q_dkv, mgpu.MgpuBwdConfig.block_kv_dq
        stages_bwd = mgpu.DEFAULT_STAGES_BWD
        why = mgpu.supported(q, k, block_q_bwd or dqb) or mgpu.supported(q, k, block_k_dq or dkb)
        if why:
            raise ValueError(f"swa_attention: backward='mosaic' does not support {why}")
        if dq_mode != "kernel":
            raise ValueError("swa_attention: backward='mosaic' computes dq in its own kernel (dq_mode='kernel')")
    elif backward != "triton":
        raise ValueError(f"swa_attention: backward must be 'triton' or 'mosaic', got {backward!r}")
    # Small sequences: shrink default tiles to the sequence (never below 16, the smallest matmul tile).
    cap = max(16, 1 << max(0, math.ceil(math.log2(max(t, 1)))))
    block_q = block_q or min(dq_, cap)
    block_k = block_k or (dk_ if forward == "mosaic" else min(dk_, cap))  # mosaic pads T to 128 rows anyway
    bwd_cap = 1 << 30 if backward == "mosaic" else cap  # the Mosaic kernels pad T to 128 rows anyway
    block_q_bwd = block_q_bwd or min(dqb, bwd_cap)
    block_k_bwd = block_k_bwd or min(dkb, bwd_cap)
    block_q_dq = block_q_dq or block_q_bwd
    block_k_dq = block_k_dq or block_k_bwd
    for name, value in (("block_q", block_q), ("block_k", block_k), ("block_q_bwd", block_q_bwd),
                        ("block_k_bwd", block_k_bwd), ("block_q_dq", block_q_dq), ("block_k_dq", block_k_dq)):
        _check_block(name, value)
    if dq_mode not in ("kernel", "atomic"):
        raise ValueError(f"swa_attention: dq_mode must be 'kernel' or 'atomic', got {dq_mode!r}")
    tile = max(block_q, block_k, block_q_bwd, block_k_bwd, block_q_dq, block_k_dq)
    if "mosaic" in (forward, backward):
        tile = max(tile, mgpu.ROWS_PER_CTA)
    tp = -(-t // tile) * tile
    persistent_ctas = _persistent_ctas(forward, min(window, tp), interpret)
    stages = num_stages or stages
    cfg = _Config(window=min(window, tp), sinks=min(sinks, t), scale=float(d ** -0.5 if scale is None else scale),
                  seq_len=t, padded_len=tp, block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                  block_k_bwd=block_k_bwd, block_q_dq=block_q_dq, block_k_dq=block_k_dq,
                  num_warps=num_warps or warps, num_warps_bwd=num_warps_bwd or warps_bwd,
                  num_warps_dq=num_warps_dq or num_warps_bwd or warps_bwd, num_stages=stages,
                  num_stages_bwd=num_stages_bwd or stages_bwd,
                  num_stages_dq=num_stages_dq or num_stages_bwd or stages_bwd, dq_mode=dq_mode,
                  lazy_rescale=bool(lazy_rescale), forward=forward, backward=backward,
                  mosaic_switches=_mosaic_switches(backward, d, block_q_bwd, interpret, min(window, tp)),
                  persistent_ctas=persistent_ctas,
                  q_buffers=mgpu.forward_q_buffers(persistent_ctas, block_k, stages, d, jnp.dtype(q.dtype).itemsize)
                  if forward == "mosaic" else 1, interpret=bool(interpret))
    if tp != t:
        pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    o, lse = _swa_padded(q, k, v, cfg)
    o = o[:, :t]
    if not return_lse:
        return o
    return o, jnp.swapaxes(lse[:, :, :t], 1, 2)
