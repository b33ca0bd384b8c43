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
  Backward: the forward kernel is rerun to save each chunk's start state, a second kernel sweeps the chunks in
  reverse carrying dS (again split over V), and the WY preparation is differentiated by XLA (jax.vjp).

Kernel bodies use only generic Pallas ops (ref indexing with pl.ds, lax.fori_loop, dot_general), so interpret mode on
CPU runs the same body that the GPU (Triton lowering) compiles. Imports only jax/numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import check_rank, chunk_cumsum, pad_time, wy_factors

F32 = jnp.float32
# Tuning knobs (GPU): value-block width when the caller gives none, and Triton warps per program. Batch-1 long
# sequences need block_v small enough that B*H*V/block_v programs fill the GPU's SMs (benchmarks/NOTES_delta_rule.md).
DEFAULT_BLOCK_V = 16  # best on the H100 at B1 T32768 H16 D128: with PRECOMPUTE_ATTN 64: 2.28 ms, 32: 1.55, 16: 1.51
FWD_WARPS = 4
BWD_WARPS = 8
WY_WARPS = 4  # H100: 4 warps 0.98-1.03 ms, 2: 0.88-1.03, 1: 2.15, 8: 1.73 (two runs; 2 and 4 tie within run noise)
USE_PALLAS_WY = True  # False: the forward prepares W, U with XLA's triangular_solve (the previous design)
# The WY kernel also writes the masked, decayed intra-chunk Q K^T that the forward kernel would otherwise recompute
# for every V block (half of its per-chunk matrix work at block_v 16).
PRECOMPUTE_ATTN = True
WY_SUB = 16  # block of the on-chip triangular inverse (the smallest Triton dot); chunks not a multiple use one block


def _pl():
    from jax.experimental import pallas as pl  # lazy: importing Pallas is slow

    return pl


def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params on GPU (selects the Triton lowering, which Mosaic GPU cannot replace here yet)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.pallas import triton as plgpu_triton
    except ImportError:  # pragma: no cover - depends on the installed jax
        return None
    return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, dtype):
    """a @ b with operands in the compute dtype and float32 accumulation."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b, dtype):
    """a^T @ b."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_nt(a, b, dtype):
    """a @ b^T."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last):
    """Per-chunk decay factors from the chunk-local cumsum: gc [C], g_last (scalar), Gamma_ij = e^{gc_i-gc_j} (i>=j)."""
    gcv = gc_ref[b, h, ts]
    g_last = jnp.sum(jnp.where(is_last, gcv, 0.0))
    # Mask before exp: above the diagonal gc_i - gc_j > 0 could overflow.
    gamma_mat = jnp.where(causal, jnp.exp(jnp.where(causal, gcv[:, None] - gcv[None, :], 0.0)), 0.0)
    return gcv, g_last, gamma_mat


def _fwd_kernel(*refs, chunk, n_chunks, block_v, scale, gated, save_states, has_attn):
    pl = _pl()
    refs = list(refs)
    q_ref, k_ref, w_ref, u_ref = refs[:4]
    gc_ref = refs[4] if gated else None
    rest = refs[5:] if gated else refs[4:]
    attn_ref = rest.pop(0) if has_attn else None
    h0_ref, o_ref, ht_ref = rest[:3]
    st_ref = rest[3] if save_states else None

    b, h, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(iv * block_v, block_v)
    cdt = q_ref.dtype
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def body(c, s):
        ts = pl.ds(c * chunk, chunk)
        if save_states:
            st_ref[b, h, c, :, vs] = s
        q = q_ref[b, ts, h, :].astype(F32)
        k = k_ref[b, ts, h, :].astype(F32)
        w = w_ref[b, ts, h, :]
        u = u_ref[b, ts, h, vs].astype(F32)
        u_new = u - _dot(w, s, cdt)
        if has_attn:  # masked, decayed Q K^T from the WY kernel (once per chunk instead of once per V block)
            attn = attn_ref[b, h, ts, :]
        if gated:
            gcv = gc_ref[b, h, ts]
            g_last = jnp.sum(jnp.where(is_last, gcv, 0.0))
            if not has_attn:
                attn = _dot_nt(q, k, cdt) * _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last)[2]
            q_dec = q * jnp.exp(gcv)[:, None]
            k_dec = k * jnp.exp(g_last - gcv)[:, None]
            s_decay = jnp.exp(g_last)
        else:
            if not has_attn:
                attn = jnp.where(causal, _dot_nt(q, k, cdt), 0.0)
            q_dec, k_dec, s_decay = q, k, 1.0
        o = (_dot(q_dec, s, cdt) + _dot(attn, u_new, cdt)) * scale
        o_ref[b, ts, h, vs] = o.astype(o_ref.dtype)
        return s * s_decay + _dot_tn(k_dec, u_new, cdt)

    s = lax.fori_loop(0, n_chunks, body, h0_ref[b, h, :, vs].astype(F32))
    ht_ref[b, h, :, vs] = s


def _bwd_kernel(*refs, chunk, n_chunks, block_v, scale, gated):
    pl = _pl()
    refs = list(refs)
    q_ref, k_ref, w_ref, u_ref = refs[:4]
    gc_ref = refs[4] if gated else None
    rest = refs[5:] if gated else refs[4:]
    st_ref, do_ref, dht_ref, dq_ref, dk_ref, dw_ref, du_ref = rest[:7]
    dgc_ref = rest[7] if gated else None
    dh0_ref = rest[8] if gated else rest[7]

    b, h, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(iv * block_v, block_v)
    cdt = q_ref.dtype
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def body(i, ds):
        c = n_chunks - 1 - i
        ts = pl.ds(c * chunk, chunk)
        s = st_ref[b, h, c, :, vs]
        q = q_ref[b, ts, h, :].astype(F32)
        k = k_ref[b, ts, h, :].astype(F32)
        w = w_ref[b, ts, h, :].astype(F32)
        u = u_ref[b, ts, h, vs].astype(F32)
        do = do_ref[b, ts, h, vs].astype(F32) * scale
        u_new = u - _dot(w, s, cdt)
        qk = _dot_nt(q, k, cdt)
        if gated:
            gcv, g_last, gamma_mat = _chunk_gates(gc_ref, b, h, ts, chunk, causal, is_last)
            attn = qk * gamma_mat
            q_gain = jnp.exp(gcv)[:, None]
            k_gain = jnp.exp(g_last - gcv)[:, None]
            s_decay = jnp.exp(g_last)
        else:
            gamma_mat = jnp.where(causal, 1.0, 0.0)
            attn = qk * gamma_mat
            q_gain, k_gain, s_decay = 1.0, 1.0, 1.0
        q_dec, k_dec = q * q_gain, k * k_gain
        # Gradients of this chunk's outputs and end state with respect to u', the start state and the inputs.
        du_new = _dot_tn(attn, do, cdt) + _dot(k_dec, ds, cdt)
        ds_prev = ds * s_decay + _dot_tn(q_dec, do, cdt) - _dot_tn(w, du_new, cdt)
        dq_dec = _dot_nt(do, s, cdt)
        d_attn = _dot_nt(do, u_new, cdt) * gamma_mat
        dk_dec = _dot_nt(u_new, ds, cdt)
        dq = dq_dec * q_gain + _dot(d_attn, k, cdt)
        dk = _dot_tn(d_attn, q, cdt) + dk_dec * k_gain
        dq_ref[iv, b, ts, h, :] = dq
        dk_ref[iv, b, ts, h, :] = dk
        dw_ref[iv, b, ts, h, :] = -_dot_nt(du_new, s, cdt)
        du_ref[b, ts, h, vs] = du_new.astype(du_ref.dtype)
        if gated:
            m = d_attn * qk  # d(loss)/d(log Gamma_ij)
            r = jnp.sum(dk_dec * k_dec, axis=1)
            dg_last = jnp.sum(r) + s_decay * jnp.sum(ds * s)
            dgc = jnp.sum(dq_dec * q_dec, axis=1) + jnp.sum(m, axis=1) - jnp.sum(m, axis=0) - r
            dgc_ref[iv, b, h, ts] = dgc + jnp.where(is_last, dg_last, 0.0)
        return ds_prev

    ds0 = lax.fori_loop(0, n_chunks, body, dht_ref[b, h, :, vs].astype(F32))
    dh0_ref[b, h, :, vs] = ds0


def _wy_kernel(*refs, chunk, sub, gated, with_attn):
    """One chunk's WY factors on chip: W = T diag(beta e^gc) K, U = T diag(beta) V with T = (I + A)^-1.

    A is strictly lower triangular; T is built in sub x sub blocks (sub = 16 on GPU, the smallest Triton dot): each
    diagonal block is inverted by forward substitution over its rows (masked vector ops), and the blocks below the
    diagonal follow from (I + A) T = I:  T_ij = -T_ii sum_{j <= m < i} A_im T_mj.  All in float32; A from k in its own
    dtype (k k^T of bf16 keys is exact with float32 accumulation).
    """
    pl = _pl()
    refs = list(refs)
    q_ref = refs.pop(0) if with_attn else None
    k_ref, v_ref, beta_ref = refs[:3]
    gc_ref = refs[3] if gated else None
    w_ref, u_ref = refs[-3:-1] if with_attn else refs[-2:]
    attn_ref = refs[-1] if with_attn else None
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdt = k_ref.dtype
    nb = chunk // sub
    rows = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
    cols = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
    strict = rows > cols
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(F32)

    def rows_of(i):
        return pl.ds(c * chunk + i * sub, sub)

    ks = [k_ref[b, rows_of(i), h, :] for i in range(nb)]
    betas = [beta_ref[b, rows_of(i), h].astype(F32) for i in range(nb)]
    gcs = [gc_ref[b, h, rows_of(i)] for i in range(nb)] if gated else None

    # Blocks of A at and below the diagonal: A_ij[r, s] = beta_r e^{gc_r - gc_s} k_r . k_s (strictly lower overall).
    a = {}
    for i in range(nb):
        for j in range(i + 1):
            blk = _dot_nt(ks[i], ks[j], cdt) * betas[i][:, None]
            if gated:
                diff = gcs[i][:, None] - gcs[j][None, :]
                # Mask before exp on the diagonal block: above its diagonal the difference is positive.
                blk = blk * jnp.exp(jnp.where(strict, diff, 0.0) if i == j else diff)
            a[i, j] = jnp.where(strict, blk, 0.0) if i == j else blk

    def substitute_row(r, ts):
        # Row r of (I + N)^-1 = e_r - sum_{s < r} N[r, s] (row s of the inverse); rows s < r are already final.
        out = []
        for i, t in enumerate(ts):
            n_row = jnp.sum(jnp.where(rows == r, a[i, i], 0.0), axis=0)
            new = -jnp.sum(n_row[:, None] * t, axis=0)
            out.append(jnp.where(rows == r, t + new[None, :], t))
        return tuple(out)

    diag = lax.fori_loop(1, sub, substitute_row, tuple(eye for _ in range(nb)))
    t = {(i, i): diag[i] for i in range(nb)}
    for i in range(nb):
        for j in range(i):
            acc = _dot(a[i, j], t[j, j], F32)
            for m in range(j + 1, i):
                acc = acc + _dot(a[i, m], t[m, j], F32)
            t[i, j] = -_dot(t[i, i], acc, F32)

    kb = [ks[j].astype(F32) * (betas[j] * jnp.exp(gcs[j]) if gated else betas[j])[:, None] for j in range(nb)]
    vb = [v_ref[b, rows_of(j), h, :].astype(F32) * betas[j][:, None] for j in range(nb)]
    for i in range(nb):
        w = _dot(t[i, 0], kb[0], F32)
        u = _dot(t[i, 0], vb[0], F32)
        for j in range(1, i + 1):
            w = w + _dot(t[i, j], kb[j], F32)
            u = u + _dot(t[i, j], vb[j], F32)
        w_ref[b, rows_of(i), h, :] = w.astype(w_ref.dtype)
        u_ref[b, rows_of(i), h, :] = u.astype(u_ref.dtype)

    if with_attn:
        # The forward kernel's intra-chunk scores, mask(Q K^T * Gamma), in q's dtype (its dot casts them so anyway).
        whole = pl.ds(c * chunk, chunk)
        k_all = k_ref[b, whole, h, :]
        gc_all = gc_ref[b, h, whole] if gated else None
        col = lax.broadcasted_iota(jnp.int32, (sub, chunk), 1)
        for i in range(nb):
            causal = lax.broadcasted_iota(jnp.int32, (sub, chunk), 0) + i * sub >= col
            qk = _dot_nt(q_ref[b, rows_of(i), h, :], k_all, cdt)
            if gated:
                qk = qk * jnp.exp(jnp.where(causal, gcs[i][:, None] - gc_all[None, :], 0.0))
            attn_ref[b, h, rows_of(i), :] = jnp.where(causal, qk, 0.0).astype(attn_ref.dtype)


def wy_factors_pallas(k, v, beta, gc, chunk: int, *, interpret: bool, q=None):
    """Pallas version of pallas_kernels.common.wy_factors, one program per (batch, head, chunk).

    k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], gc: [B, H, T] float32 (chunk-local cumsum) or None; T a multiple
    of `chunk`. Returns w: [B, T, H, K] (k.dtype), u: [B, T, H, V] (v.dtype), and with q ([B, T, H, K]) given also
    attn: [B, H, T, chunk] (q.dtype), row t holding mask(q_t . k_s e^{gc_t - gc_s}) for s in t's chunk (s <= t).
    Not differentiable by itself (the custom_vjp differentiates the XLA version).
    """
    pl = _pl()
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    if t % chunk:
        raise ValueError(f"the time axis of k ({t}) must be a multiple of chunk={chunk}")
    sub = WY_SUB if chunk % WY_SUB == 0 else chunk
    gated = gc is not None
    with_attn = q is not None
    kernel = functools.partial(_wy_kernel, chunk=chunk, sub=sub, gated=gated, with_attn=with_attn)
    args = ([q] if with_attn else []) + [k, v, beta] + ([gc] if gated else [])
    out_shape = (jax.ShapeDtypeStruct((b, t, h, dk), k.dtype), jax.ShapeDtypeStruct((b, t, h, dv), v.dtype))
    if with_attn:
        out_shape += (jax.ShapeDtypeStruct((b, h, t, chunk), q.dtype),)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, t // chunk), interpret=interpret,
                          compiler_params=_compiler_params(WY_WARPS, 1), name="delta_rule_wy")(*args)


def _pick_block_v(dv: int, block_v):
    if block_v is None:
        block_v = DEFAULT_BLOCK_V if dv % DEFAULT_BLOCK_V == 0 else dv
    if dv % block_v:
        raise ValueError(f"block_v={block_v} must divide the value dimension V={dv} of v")
    return block_v


def _run_forward(q, k, w, u, gc, h0, *, chunk, scale, block_v, interpret, save_states, attn=None):
    pl = _pl()
    b, t, h, dk = q.shape
    dv = u.shape[-1]
    n = t // chunk
    gated = gc is not None
    out_shape = [jax.ShapeDtypeStruct((b, t, h, dv), u.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), F32))
    kernel = functools.partial(_fwd_kernel, chunk=chunk, n_chunks=n, block_v=block_v, scale=scale, gated=gated,
                               save_states=save_states, has_attn=attn is not None)
    args = [q, k, w, u] + ([gc] if gated else []) + ([] if attn is None else [attn]) + [h0]
    outs = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=(b, h, dv // block_v), interpret=interpret,
                          compiler_params=_compiler_params(FWD_WARPS if dk <= 128 else 2 * FWD_WARPS, 2),
                          name="delta_rule_fwd")(*args)
    return outs


def _run_backward(q, k, w, u, gc, states, do, dht, *, chunk, scale, block_v, interpret):
    pl = _pl()
    b, t, h, dk = q.shape
    dv = u.shape[-1]
    n = t // chunk
    nv = dv // block_v
    gated = gc is not None
    out_shape = [jax.ShapeDtypeStruct((nv, b, t, h, dk), F32)] * 3 + [jax.ShapeDtypeStruct((b, t, h, dv), F32)]
    if gated:
        out_shape.append(jax.ShapeDtypeStruct((nv, b, h, t), F32))
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
    kernel = functools.partial(_bwd_kernel, chunk=chunk, n_chunks=n, block_v=block_v, scale=scale, gated=gated)
    args = [q, k, w, u] + ([gc] if gated else []) + [states, do, dht]
    outs = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=(b, h, nv), interpret=interpret,
                          compiler_params=_compiler_params(BWD_WARPS, 1), name="delta_rule_bwd")(*args)
    dq, dk_, dw, du = (x.sum(0) if x.ndim == 5 else x for x in outs[:4])
    dgc = outs[4].sum(0) if gated else None
    return dq, dk_, dw, du, dgc, outs[-1]


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
                         save_states=False, attn=attn)
    return o[:, :t], ht, (q, k, v, g, beta, h0)


def _core_vjp_fwd(q, k, v, g, beta, h0, chunk, scale, block_v, interpret):
    o, ht, res = _core_fwd(q, k, v, g, beta, h0, chunk, scale, block_v, interpret)
    return (o, ht), res


def _core_vjp_bwd(chunk, scale, block_v, interpret, res, cts):
    q, k, v, g, beta, h0 = res
    do, dht = cts
    t = q.shape[1]
    (w, u, gc), prep_vjp = jax.vjp(lambda k_, v_, g_, b_: _prepare(k_, v_, g_, b_, chunk), k, v, g, beta)
    qp, _ = pad_time(q, chunk)
    kp, _ = pad_time(k, chunk)
    dop, _ = pad_time(do.astype(v.dtype), chunk)
    # Recompute each chunk's start state (written to HBM only in the backward, where the reverse sweep needs it).
    _, _, states = _run_forward(qp, kp, w, u, gc, h0, chunk=chunk, scale=scale, block_v=block_v,
                                interpret=interpret, save_states=True)
    dq, dk_direct, dw, du, dgc, dh0 = _run_backward(qp, kp, w, u, gc, states, dop, dht.astype(F32), chunk=chunk,
                                                    scale=scale, block_v=block_v, interpret=interpret)
    dk_prep, dv, dg, dbeta = prep_vjp((dw.astype(w.dtype), du.astype(u.dtype), dgc))
    dq = dq[:, :t].astype(q.dtype)
    dk = (dk_direct[:, :t] + dk_prep.astype(F32)).astype(k.dtype)
    return dq, dk, dv, dg, dbeta, dh0.astype(h0.dtype)


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
