"""The WY preparation of the chunked (gated) delta rule as Pallas kernels, one program per (batch, head, chunk):
forward (W, U and optionally the masked intra-chunk scores) and its VJP (d k, d v, d beta, d gc from d W, d U).

Per chunk (C rows; gamma_i = e^{gc_i}, gc the chunk-local cumsum of g, 1 when ungated):
  A_ij = beta_i (gamma_i / gamma_j) k_i.k_j  (i > j, else 0),  T = (I + A)^-1,
  KB = diag(beta gamma) K,  VB = diag(beta) V,  W = T KB,  U = T VB.
VJP (derived from dT^-1 = -T^-1 dM T^-1 and checked against jax.vjp of pallas_kernels.common.wy_factors in the tests):
  dKB = T^T dW,  dVB = T^T dU,
  dA  = -strict_lower(T^T (dW KB^T + dU VB^T) T^T) = -strict_lower(dKB W^T + dVB U^T)   (W = T KB, U = T VB),
then through A, KB, VB to k, beta and gc (see _wy_vjp_kernel). The second form of dA needs no extra products with T.

T is built in sub x sub blocks (sub = WY_SUB = 16, the smallest Triton dot; larger blocks lose precision). Each
diagonal block of I + A is inverted either by forward substitution over its rows (WY_INVERSE = "substitution": sub - 1
dependent masked vector steps) or by the product form (I + N)^-1 = (I - N)(I + N^2)(I + N^4)...(I + N^(sub/2)) of a
nilpotent N (WY_INVERSE = "product": 2 log2(sub) - 2 dots, exact because N^sub = 0); the blocks below the diagonal
follow from (I + A) T = I: T_ij = -T_ii sum_{j<=m<i} A_im T_mj.
Imports only jax/numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import F32, dot, dot_nt, dot_tn, pallas_module, triton_params

WY_WARPS = 4  # H100: 4 warps 0.98-1.03 ms, 2: 0.88-1.03, 1: 2.15, 8: 1.73 (two runs; 2 and 4 tie within run noise)
WY_VJP_WARPS = 4
# Chunks per program of the forward WY kernel (unrolled: independent chains the compiler could interleave); used when
# it divides the number of chunks, else 1. H100, B1 T32768 H16 D128 (benchmarks/sweep_delta_rule.py): WY kernel 1.03 ms
# at 1, 1.87 at 2, 1.95 at 4, 1.81 at 2 with 8 warps (2 warps at 1: 1.56 in that run): more per program is slower.
WY_CHUNKS_PER_PROGRAM = 1
# Block of the on-chip triangular inverse (16: the smallest Triton dot); chunks not a multiple use one block. Larger
# blocks are faster but lose precision: H100, B1 T32768 H16 D128 gated forward 1.683-1.697 ms at 16 vs 1.532-1.587 at
# 32, but on strongly correlated keys (cosines ~0.8) with the plain rule the product form at 32 returns W with
# relative error 1.09 (output 1.0) against 4.2e-3 at 16; at 64 it overflows (sweep_delta_rule.py's wy_precision,
# fifth session). Gated keys decay and stay accurate at every size. So 16.
WY_SUB = 16
# "product" (dots) or "substitution" (the latency-bound row substitution; see module docstring). H100, B1 T32768 H16
# D128: WY kernel 0.87 ms (product) vs 1.16 ms (substitution), same agreement with the XLA solve (benchmarks/RESULTS.md).
WY_INVERSE = "product"
_INVERSES = ("substitution", "product")


def _sub_block(chunk: int) -> int:
    return WY_SUB if chunk % WY_SUB == 0 else chunk


def _a_blocks(ks, betas, gcs, sub, cdt):
    """Blocks (i >= j) of A = diag(beta) (K K^T * Gamma), strictly lower overall, as (kk, gamma, a) dicts.

    kk[i, j] = K_i K_j^T (in the compute dtype, float32 accumulation), gamma[i, j] = e^{gc_r - gc_s} masked to the
    strict lower part on diagonal blocks (None when ungated), a[i, j] = beta_r * kk * gamma (0 on/above the diagonal).
    """
    rows = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
    strict = rows > lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
    kk, gamma, a = {}, {}, {}
    for i in range(len(ks)):
        for j in range(i + 1):
            kk[i, j] = dot_nt(ks[i], ks[j], cdt)
            blk = kk[i, j] * betas[i][:, None]
            if gcs is not None:
                diff = gcs[i][:, None] - gcs[j][None, :]
                # Mask before exp on the diagonal block: above its diagonal the difference is positive (overflow).
                gamma[i, j] = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0) if i == j else jnp.exp(diff)
                blk = blk * gamma[i, j]
            else:
                gamma[i, j] = None
            a[i, j] = jnp.where(strict, blk, 0.0) if i == j else blk
    return kk, gamma, a


def _invert_diagonal_blocks(diag_a, sub, method):
    """(I + N)^-1 for each strictly lower sub x sub block N in diag_a (a list), float32."""
    rows = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
    eye = jnp.where(rows == lax.broadcasted_iota(jnp.int32, (sub, sub), 1), 1.0, 0.0).astype(F32)
    if method == "product":
        out = []
        for n in diag_a:
            inv = eye - n
            p = n
            for _ in range(max(0, (sub - 1).bit_length() - 1)):  # N^2 ... N^(sub/2): N^2, N^4, N^8 for sub = 16
                p = dot(p, p, F32)
                inv = inv + dot(inv, p, F32)
            out.append(inv)
        return out

    def substitute_row(r, ts):
        # Row r of (I + N)^-1 = e_r - sum_{s < r} N[r, s] (row s of the inverse); rows s < r are already final.
        out = []
        for n, t in zip(diag_a, ts):
            n_row = jnp.sum(jnp.where(rows == r, n, 0.0), axis=0)
            new = -jnp.sum(n_row[:, None] * t, axis=0)
            out.append(jnp.where(rows == r, t + new[None, :], t))
        return tuple(out)

    return list(lax.fori_loop(1, sub, substitute_row, tuple(eye for _ in diag_a)))


def _t_blocks(a, nb, sub, method):
    """Blocks (i >= j) of T = (I + A)^-1 from the blocks of A."""
    diag = _invert_diagonal_blocks([a[i, i] for i in range(nb)], sub, method)
    t = {(i, i): diag[i] for i in range(nb)}
    for i in range(nb):
        for j in range(i):
            acc = dot(a[i, j], t[j, j], F32)
            for m in range(j + 1, i):
                acc = acc + dot(a[i, m], t[m, j], F32)
            t[i, j] = -dot(t[i, i], acc, F32)
    return t


def _load_chunk(k_ref, v_ref, beta_ref, gc_ref, b, h, c, chunk, sub):
    """The chunk's keys (own dtype), beta, gc (or None), KB and VB (float32), in sub-row blocks."""
    nb = chunk // sub

    def rows_of(i):
        return pallas_module().ds(c * chunk + i * sub, sub)

    ks = [k_ref[b, rows_of(i), h, :] for i in range(nb)]
    vs = [v_ref[b, rows_of(i), h, :].astype(F32) for i in range(nb)]
    betas = [beta_ref[b, rows_of(i), h].astype(F32) for i in range(nb)]
    gcs = [gc_ref[b, h, rows_of(i)] for i in range(nb)] if gc_ref is not None else None
    kscale = [betas[j] * jnp.exp(gcs[j]) if gcs is not None else betas[j] for j in range(nb)]
    kb = [ks[j].astype(F32) * kscale[j][:, None] for j in range(nb)]
    vb = [vs[j] * betas[j][:, None] for j in range(nb)]
    return rows_of, ks, vs, betas, gcs, kscale, kb, vb


def _wy_kernel(*refs, chunk, sub, gated, with_attn, method, per_program):
    """`per_program` consecutive chunks' WY factors on chip: W = T diag(beta e^gc) K, U = T diag(beta) V (and the
    masked scores). The chunks are independent: unrolled in one program, their latency-bound chains can interleave."""
    pl = pallas_module()
    refs = list(refs)
    q_ref = refs.pop(0) if with_attn else None
    k_ref, v_ref, beta_ref = refs[:3]
    gc_ref = refs[3] if gated else None
    w_ref, u_ref = refs[-3:-1] if with_attn else refs[-2:]
    attn_ref = refs[-1] if with_attn else None
    b, h, first = pl.program_id(0), pl.program_id(1), pl.program_id(2) * per_program
    for c in range(per_program):
        _wy_chunk(q_ref, k_ref, v_ref, beta_ref, gc_ref, w_ref, u_ref, attn_ref, b, h, first + c, chunk=chunk, sub=sub,
                  gated=gated, with_attn=with_attn, method=method)


def _wy_chunk(q_ref, k_ref, v_ref, beta_ref, gc_ref, w_ref, u_ref, attn_ref, b, h, c, *, chunk, sub, gated, with_attn,
              method):
    pl = pallas_module()
    cdt = k_ref.dtype
    nb = chunk // sub
    rows_of, ks, _, betas, gcs, _, kb, vb = _load_chunk(k_ref, v_ref, beta_ref, gc_ref, b, h, c, chunk, sub)
    _, _, a = _a_blocks(ks, betas, gcs, sub, cdt)
    t = _t_blocks(a, nb, sub, method)
    for i in range(nb):
        w = dot(t[i, 0], kb[0], F32)
        u = dot(t[i, 0], vb[0], F32)
        for j in range(1, i + 1):
            w = w + dot(t[i, j], kb[j], F32)
            u = u + dot(t[i, j], vb[j], F32)
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
            qk = dot_nt(q_ref[b, rows_of(i), h, :], k_all, cdt)
            if gated:
                qk = qk * jnp.exp(jnp.where(causal, gcs[i][:, None] - gc_all[None, :], 0.0))
            attn_ref[b, h, rows_of(i), :] = jnp.where(causal, qk, 0.0).astype(attn_ref.dtype)


def _check(k, chunk, method):
    if k.shape[1] % chunk:
        raise ValueError(f"the time axis of k ({k.shape[1]}) must be a multiple of chunk={chunk}")
    if method not in _INVERSES:
        raise ValueError(f"WY inverse method must be one of {_INVERSES}, got {method!r}")


def wy_factors_pallas(k, v, beta, gc, chunk: int, *, interpret: bool, q=None, method=None):
    """Pallas version of pallas_kernels.common.wy_factors, one program per (batch, head, chunk).

    k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], gc: [B, H, T] float32 (chunk-local cumsum) or None; T a multiple
    of `chunk`. Returns w: [B, T, H, K] (k.dtype), u: [B, T, H, V] (v.dtype), and with q ([B, T, H, K]) given also
    attn: [B, H, T, chunk] (q.dtype), row t holding mask(q_t . k_s e^{gc_t - gc_s}) for s in t's chunk (s <= t).
    method: the diagonal-block inverse ("substitution" or "product"; None = WY_INVERSE). Not differentiable by itself
    (wy_factors_vjp_pallas is its VJP).
    """
    method = WY_INVERSE if method is None else method
    _check(k, chunk, method)
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    gated = gc is not None
    with_attn = q is not None
    n = t // chunk
    per_program = WY_CHUNKS_PER_PROGRAM if n % WY_CHUNKS_PER_PROGRAM == 0 else 1
    kernel = functools.partial(_wy_kernel, chunk=chunk, sub=_sub_block(chunk), gated=gated, with_attn=with_attn,
                               method=method, per_program=per_program)
    args = ([q] if with_attn else []) + [k, v, beta] + ([gc] if gated else [])
    out_shape = (jax.ShapeDtypeStruct((b, t, h, dk), k.dtype), jax.ShapeDtypeStruct((b, t, h, dv), v.dtype))
    if with_attn:
        out_shape += (jax.ShapeDtypeStruct((b, h, t, chunk), q.dtype),)
    return pallas_module().pallas_call(kernel, out_shape=out_shape, grid=(b, h, n // per_program), interpret=interpret,
                                       compiler_params=triton_params(WY_WARPS, 1), name="delta_rule_wy")(*args)


def _wy_vjp_kernel(*refs, chunk, sub, gated, method):
    """One chunk's VJP of the WY preparation: (dW, dU) -> (dk, dv, dbeta, dgc), float32.

    Recomputes A, T, W, U on chip (float32), then dKB = T^T dW, dVB = T^T dU, dA = -strict(dKB W^T + dVB U^T), and
      k:    dk_i = (beta gamma)_i dKB_i + sum_j D_ij k_j + sum_j D_ji k_j,  D = dA * beta_i * Gamma_ij
      beta: dbeta_i = gamma_i (dKB_i.k_i) + dVB_i.v_i + sum_j dA_ij Gamma_ij k_i.k_j
      gc:   dgc_i = beta_i gamma_i (dKB_i.k_i) + sum_j P_ij - sum_j P_ji,  P = dA * A   (d A_ij / d gc = +-A_ij)
      v:    dv_i = beta_i dVB_i
    """
    pl = pallas_module()
    refs = list(refs)
    k_ref, v_ref, beta_ref = refs[:3]
    gc_ref = refs[3] if gated else None
    rest = refs[4:] if gated else refs[3:]
    dw_ref, du_ref, dk_ref, dv_ref, dbeta_ref = rest[:5]
    dgc_ref = rest[5] if gated else None
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdt = k_ref.dtype
    nb = chunk // sub
    rows_of, ks, vs, betas, gcs, kscale, kb, vb = _load_chunk(k_ref, v_ref, beta_ref, gc_ref, b, h, c, chunk, sub)
    kk, gamma, a = _a_blocks(ks, betas, gcs, sub, cdt)
    t = _t_blocks(a, nb, sub, method)
    w, u = [], []
    for i in range(nb):
        w.append(sum(dot(t[i, j], kb[j], F32) for j in range(i + 1)))
        u.append(sum(dot(t[i, j], vb[j], F32) for j in range(i + 1)))
    dw = [dw_ref[b, rows_of(i), h, :].astype(F32) for i in range(nb)]
    du = [du_ref[b, rows_of(i), h, :].astype(F32) for i in range(nb)]
    dkb = [sum(dot_tn(t[i, j], dw[i], F32) for i in range(j, nb)) for j in range(nb)]
    dvb = [sum(dot_tn(t[i, j], du[i], F32) for i in range(j, nb)) for j in range(nb)]

    rows = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
    strict = rows > lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
    kf = [x.astype(F32) for x in ks]
    dk = [dkb[i] * kscale[i][:, None] for i in range(nb)]
    s_kb = [jnp.sum(dkb[i] * kf[i], axis=1) for i in range(nb)]  # dKB_i . k_i
    dbeta = [s_kb[i] * (jnp.exp(gcs[i]) if gated else 1.0) + jnp.sum(dvb[i] * vs[i], axis=1) for i in range(nb)]
    dgc = [s_kb[i] * kscale[i] for i in range(nb)] if gated else None
    for i in range(nb):
        for j in range(i + 1):
            da = -(dot_nt(dkb[i], w[j], F32) + dot_nt(dvb[i], u[j], F32))
            if i == j:
                da = jnp.where(strict, da, 0.0)
            da_g = da if gamma[i, j] is None else da * gamma[i, j]  # dA * Gamma (masked like A)
            dbeta[i] = dbeta[i] + jnp.sum(da_g * kk[i, j], axis=1)
            d = da_g * betas[i][:, None]
            dk[i] = dk[i] + dot(d, kf[j], F32)
            dk[j] = dk[j] + dot_tn(d, kf[i], F32)
            if gated:
                p = da * a[i, j]
                dgc[i] = dgc[i] + jnp.sum(p, axis=1)
                dgc[j] = dgc[j] - jnp.sum(p, axis=0)
    for i in range(nb):
        dk_ref[b, rows_of(i), h, :] = dk[i]
        dv_ref[b, rows_of(i), h, :] = dvb[i] * betas[i][:, None]
        dbeta_ref[b, rows_of(i), h] = dbeta[i]
        if gated:
            dgc_ref[b, h, rows_of(i)] = dgc[i]


def wy_factors_vjp_pallas(k, v, beta, gc, dw, du, chunk: int, *, interpret: bool, method=None):
    """VJP of wy_factors (pallas_kernels.common) with respect to k, v, beta and gc, one program per (batch, head, chunk).

    k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], gc: [B, H, T] float32 or None; dw: [B, T, H, K], du: [B, T, H, V]
    (cotangents of w, u; any float dtype). T a multiple of `chunk`. Returns float32 (dk [B, T, H, K], dv [B, T, H, V],
    dbeta [B, T, H], dgc [B, H, T] or None when gc is None).
    """
    method = WY_INVERSE if method is None else method
    _check(k, chunk, method)
    if dw.shape != k.shape or du.shape != v.shape:
        raise ValueError(f"dw/du must have the shapes of k/v {tuple(k.shape)}/{tuple(v.shape)}, got "
                         f"{tuple(dw.shape)}/{tuple(du.shape)}")
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    gated = gc is not None
    kernel = functools.partial(_wy_vjp_kernel, chunk=chunk, sub=_sub_block(chunk), gated=gated, method=method)
    args = [k, v, beta] + ([gc] if gated else []) + [dw, du]
    out_shape = (jax.ShapeDtypeStruct((b, t, h, dk), F32), jax.ShapeDtypeStruct((b, t, h, dv), F32),
                 jax.ShapeDtypeStruct((b, t, h), F32))
    if gated:
        out_shape += (jax.ShapeDtypeStruct((b, h, t), F32),)
    outs = pallas_module().pallas_call(kernel, out_shape=out_shape, grid=(b, h, t // chunk), interpret=interpret,
                                       compiler_params=triton_params(WY_VJP_WARPS, 1), name="delta_rule_wy_vjp")(*args)
    return tuple(outs) + (() if gated else (None,))
