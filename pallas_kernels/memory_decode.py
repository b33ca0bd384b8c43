"""One decode step of a (gated) delta-rule AHN memory as a single Pallas kernel (issue 5, hybrid decode at batch 1).

The XLA form of this step (ahn_jax/inference/decode.py: _memory_decode + DeltaNetMemory.step + read_out) is ~20 small
kernels per layer: gathers of the evicted token's k, v and gates from the ring, l2 norms, the state update and
readout, the AHN head (gamma projection, RMSNorm, silu gate, per-head o_proj) and the evict selects. Here one program
per (sequence b, query head h) does all of it:

    slot, evict   the evicted token's ring slot [B] int32 and whether sequence b evicts at all [B]
    k, v          ring_k / ring_v [b, h // G, slot]    (post-RoPE, KV head of query head h, G = Hq / Hkv)
    beta, g       gates [b, slot, h]                   (written when the token entered the window; g only for GDN)
    q^, k^        l2-normalised (float32, eps 1e-6 inside the rsqrt; ops.gated_delta.l2_normalize)
    S             <- e^g S;  v' = beta (v - S^T k^);  S <- S + k^ v'^T          (ops.gated_delta._one_step)
    o             = scale * S^T q^
    gamma         = u . g_proj[:, h]                   (u [B, hidden]: the reading token's prenormed hidden state)
    y_h           = (RMSNorm_D(o) * o_norm * silu(gamma)) @ o_proj[h]            (DeltaNetMemory.read_out)
    where evict[b] is False: S is left as it was and y_h = 0.

Rounding follows the XLA path in the compute dtype `cdt` (the memory's dtype, else q's): q, k, v are cast to cdt; the
l2-normalised q, k, the readout o and gamma are rounded to cdt (their XLA ops return cdt); the state, gates, norms and
every sum are float32; the o_proj product takes cdt operands with a float32 sum and returns cdt.

The state [B, Hq, D, D] float32 is aliased input -> output (input_output_aliases), so a donated cache state is
updated in place; a program that does not evict skips its store. Products are broadcast-multiplies + sums ([D] x
[D, D]): a 1-row tl.dot would need tiles >= 16 and waste the tensor cores anyway. The gamma dot runs over the hidden
axis in power-of-two blocks (Triton loads need power-of-two sizes; every Qwen hidden size is a multiple of 128).

Split form (block_v): at batch 1 the grid above has only Hq programs (16 for Qwen2.5-3B) on a GPU with 132 SMs. The
state update and readout are independent per value column, so a first kernel runs them over (B, Hq, D / block_v)
programs, each on a [D, block_v] slice of the state, and writes o; a second kernel over (B, Hq) applies the head
(which needs all of o for its RMSNorm). Same rounding as the one-kernel form.

Column form (fused_delta_decode_columns): the split form's grid without its second kernel. Program (b, h, j) loads
its [D, block_v] state slice and the matching block_v rows of o_proj[h] before anything that depends on the ring
slot, updates and reads out its columns, and writes partials of the head: ss = sum of its o^2, its share of the gate
dot u . g_proj[:, h] (by hidden blocks) and py = sum_i rnd(o_i o_norm_i) o_proj[h, i, :] ([D] float32). XLA finishes
the head, y_h = rsqrt(sum_j ss / D + eps) silu(gamma_h) sum_j py_j (fused into the layer's next elementwise kernel).
The RMS scale and the gate are per-head scalars factored out of the o_proj sum: the same math in float32; in bf16 the
operand rounded before the o_proj product is o * o_norm instead of the whole normed row (ulp-level differences).

Two ways to get the evicted token: gather_in_kernel=True indexes the ring refs at the slot loaded from `slot`
(dynamic scalar indices, which the Triton lowering turns into pointer offsets); False gathers the [B, Hkv, D] rows and
[B, Hq] gates with XLA first (one extra small fusion) and the kernel reads them at index 0, a fallback if the dynamic
index ever fails to lower. Forward only: decode is never differentiated (training uses ops.gated_delta).
Imports only jax/numpy (layer rule).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import F32, pallas_module, triton_params

# The D x D float32 state and the D x D o_proj tile of one head (64 KB each at D 128) live in registers: 8 warps
# keep them at ~64 registers per thread each.
NUM_WARPS = 8
SPLIT_STATE_WARPS = 4  # the split form's state kernel holds a [D, block_v] slice only
COLUMN_BLOCK = 16  # the column form's value columns per program: 128 programs for Qwen2.5-3B at batch 1
COLUMN_WARPS = 4  # a [D, 16] state slice and [16, D] o_proj rows per program
_L2_EPS = 1e-6  # ops.gated_delta.l2_normalize


def _hidden_block(hidden: int) -> int:
    """Largest power of two <= 512 dividing `hidden` (the gamma dot's load size)."""
    block = 512
    while block > 1 and hidden % block:
        block //= 2
    return block


def _rnd(x, cdt):
    """What an XLA op returning cdt does to a float32 value."""
    return x.astype(cdt).astype(F32)


def _l2(x, cdt):
    return _rnd(x * lax.rsqrt(jnp.sum(x * x) + _L2_EPS), cdt)


def _evicted_inputs(slot_ref, evict_ref, q_ref, k_ref, beta_ref, g_ref, b, h, group, gathered, cdt):
    """The reading query and the evicted token's key (l2-normalised, [D]), its beta, its decay e^g (1.0 without
    g), the slot it sits in and whether sequence b evicts at all."""
    hk = h // group
    slot = 0 if gathered else slot_ref[b]
    q = _l2(_rnd(q_ref[b, h, :].astype(F32), cdt), cdt)
    k = _l2(_rnd(k_ref[b, hk, slot, :].astype(F32), cdt), cdt)
    beta = beta_ref[b, slot, h].astype(F32)
    decay = jnp.exp(g_ref[b, slot, h].astype(F32)) if g_ref is not None else 1.0
    return q, k, beta, decay, slot, hk, evict_ref[b] != 0


def _update_and_read(s, q, k, v, beta, decay, scale, cdt):
    """S <- e^g S; v' = beta (v - S^T k); S <- S + k v'^T; o = scale S^T q (rounded to cdt), for the state's columns
    at hand ([D, n] with v [n]): the update is independent per value column."""
    s = s * decay
    v_new = beta * (v - jnp.sum(s * k[:, None], axis=0))  # S^T k: sum over the key axis
    s = s + k[:, None] * v_new[None, :]
    return s, _rnd(scale * jnp.sum(s * q[:, None], axis=0), cdt)


def _head(o, u_ref, gproj_ref, onorm_ref, oproj_ref, b, h, *, norm_eps, cdt, hidden_block, n_hidden_blocks):
    """The AHN head of one query head: (RMSNorm_D(o) * o_norm * silu(u . g_proj[:, h])) @ o_proj[h] -> [D] float32."""
    pl = pallas_module()
    d = o.shape[0]

    def gamma_block(i, acc):
        hs = pl.ds(i * hidden_block, hidden_block)
        return acc + jnp.sum(_rnd(u_ref[b, hs].astype(F32), cdt) * _rnd(gproj_ref[hs, h].astype(F32), cdt))

    gamma = _rnd(lax.fori_loop(0, n_hidden_blocks, gamma_block, jnp.zeros((), F32)), cdt)
    gate = gamma / (1.0 + jnp.exp(-gamma))  # silu
    normed = o * lax.rsqrt(jnp.sum(o * o) / d + norm_eps) * onorm_ref[...].astype(F32) * gate
    return jnp.sum(_rnd(normed, cdt)[:, None] * _rnd(oproj_ref[h, :, :].astype(F32), cdt), axis=0)


def _kernel(slot_ref, evict_ref, q_ref, k_ref, v_ref, beta_ref, *refs, group, has_decay, gathered, scale,
            norm_eps, cdt, hidden_block, n_hidden_blocks):
    """The whole step of one (sequence, query head): state update, readout and head."""
    pl = pallas_module()
    if has_decay:
        g_ref, u_ref, gproj_ref, onorm_ref, oproj_ref, state_in_ref, y_ref, state_ref = refs
    else:
        g_ref = None
        u_ref, gproj_ref, onorm_ref, oproj_ref, state_in_ref, y_ref, state_ref = refs
    b, h = pl.program_id(0), pl.program_id(1)
    d = q_ref.shape[-1]
    q, k, beta, decay, slot, hk, evict = _evicted_inputs(slot_ref, evict_ref, q_ref, k_ref, beta_ref, g_ref, b, h,
                                                         group, gathered, cdt)
    v = _rnd(v_ref[b, hk, slot, :].astype(F32), cdt)
    # state_ref is the output aliased to state_in_ref (the same buffer): a program that does not evict stores nothing
    # and leaves the old state in place.
    s, o = _update_and_read(state_in_ref[b, h, :, :], q, k, v, beta, decay, scale, cdt)

    @pl.when(evict)
    def _():
        state_ref[b, h, :, :] = s

    y = _head(o, u_ref, gproj_ref, onorm_ref, oproj_ref, b, h, norm_eps=norm_eps, cdt=cdt, hidden_block=hidden_block,
              n_hidden_blocks=n_hidden_blocks)
    y_ref[b, pl.ds(h * d, d)] = jnp.where(evict, y, 0.0).astype(y_ref.dtype)


def _state_kernel(slot_ref, evict_ref, q_ref, k_ref, v_ref, beta_ref, *refs, group, has_decay, gathered, scale, cdt,
                  block_v):
    """Split form, first kernel: one (sequence, query head, block of value columns) updates its [D, block_v] slice of
    the state and writes that slice of the readout o (in cdt)."""
    pl = pallas_module()
    g_ref, state_in_ref, o_ref, state_ref = refs if has_decay else (None, *refs)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(j * block_v, block_v)
    q, k, beta, decay, slot, hk, evict = _evicted_inputs(slot_ref, evict_ref, q_ref, k_ref, beta_ref, g_ref, b, h,
                                                         group, gathered, cdt)
    v = _rnd(v_ref[b, hk, slot, cols].astype(F32), cdt)
    s, o = _update_and_read(state_in_ref[b, h, :, cols], q, k, v, beta, decay, scale, cdt)

    @pl.when(evict)
    def _():
        state_ref[b, h, :, cols] = s

    o_ref[b, h, cols] = o.astype(o_ref.dtype)


def _column_kernel(slot_ref, evict_ref, q_ref, k_ref, v_ref, beta_ref, *refs, group, has_decay, gathered, scale,
                   cdt, block_v, hidden_block, n_hidden_blocks):
    """Column form: one (sequence, query head, block j of value columns) updates its [D, block_v] state slice and
    writes the head's partials for its columns: [sum of o^2, its share of u . g_proj[:, h], 0...] and py [D]. The
    gate dot is shared out by hidden blocks j, j + nj, ... The slot-independent loads come first."""
    pl = pallas_module()
    g_ref, u_ref, gproj_ref, onorm_ref, oproj_ref, state_in_ref, ss_ref, py_ref, state_ref = \
        refs if has_decay else (None, *refs)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nj = q_ref.shape[-1] // block_v
    cols = pl.ds(j * block_v, block_v)
    s_old = state_in_ref[b, h, :, cols]
    w = _rnd(oproj_ref[h, cols, :].astype(F32), cdt)  # [block_v, D]: the rows of o_proj[h] these columns feed
    o_norm = onorm_ref[cols].astype(F32)
    gamma_part = jnp.zeros((), F32)
    for i in range(-(-n_hidden_blocks // nj)):  # static: hidden blocks per program, rounded up
        blk = j + i * nj
        hs = pl.ds(jnp.minimum(blk, n_hidden_blocks - 1) * hidden_block, hidden_block)
        part = jnp.sum(_rnd(u_ref[b, hs].astype(F32), cdt) * _rnd(gproj_ref[hs, h].astype(F32), cdt))
        gamma_part += jnp.where(blk < n_hidden_blocks, part, 0.0)
    q, k, beta, decay, slot, hk, evict = _evicted_inputs(slot_ref, evict_ref, q_ref, k_ref, beta_ref, g_ref, b, h,
                                                         group, gathered, cdt)
    v = _rnd(v_ref[b, hk, slot, cols].astype(F32), cdt)
    s, o = _update_and_read(s_old, q, k, v, beta, decay, scale, cdt)

    @pl.when(evict)
    def _():
        state_ref[b, h, :, cols] = s

    lane = lax.broadcasted_iota(jnp.int32, (8,), 0)  # 8 lanes: a vector store
    ss_ref[b, h, j, :] = jnp.where(lane == 0, jnp.sum(o * o), jnp.where(lane == 1, gamma_part, 0.0))
    py_ref[b, h, j, :] = jnp.sum(_rnd(o * o_norm, cdt)[:, None] * w, axis=0)


def _head_kernel(evict_ref, o_ref, u_ref, gproj_ref, onorm_ref, oproj_ref, y_ref, *, norm_eps, cdt, hidden_block,
                 n_hidden_blocks):
    """Split form, second kernel: the head of one (sequence, query head) from the readout o."""
    pl = pallas_module()
    b, h = pl.program_id(0), pl.program_id(1)
    d = o_ref.shape[-1]
    y = _head(o_ref[b, h, :].astype(F32), u_ref, gproj_ref, onorm_ref, oproj_ref, b, h, norm_eps=norm_eps, cdt=cdt,
              hidden_block=hidden_block, n_hidden_blocks=n_hidden_blocks)
    y_ref[b, pl.ds(h * d, d)] = jnp.where(evict_ref[b] != 0, y, 0.0).astype(y_ref.dtype)


def fused_delta_decode(state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm, o_proj, *, scale,
                       norm_eps, compute_dtype=None, gather_in_kernel=True, interpret=None, block_v=None):
    """One memory decode step of AHN-DN (g None) or AHN-GDN for every sequence and query head.

    state [B, Hq, D, D] float32 (aliased: updated in place when donated); q [B, Hq, D] the reading token's query;
    ring_k, ring_v [B, Hkv, R, D] (Hq % Hkv == 0); beta, g [B, R, Hq] float32 gates per ring slot (g None: no decay);
    slot [B] int ring slot of each sequence's evicted token; evict [B] bool; u [B, hidden] the reading token's
    prenormed hidden state; g_proj [hidden, Hq]; o_norm [D]; o_proj [Hq, D, D] ([in, out]).
    compute_dtype: the memory's dtype (None: q's). interpret None: interpret mode off the GPU. block_v (dividing D):
    the split form, two kernels: the state update and readout over (B, Hq, D / block_v) programs, then the head over
    (B, Hq) (at batch 1 the one-kernel form has only Hq programs); None: one kernel.
    Returns (y [B, Hq * D] in compute_dtype, zero where evict is False; new state [B, Hq, D, D] float32).
    """
    bsz, hq, d = q.shape
    cdt, interpret, slot, ring_k, ring_v, beta, g = _prepare(
        state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm, o_proj, compute_dtype, gather_in_kernel,
        interpret)
    hkv = ring_k.shape[1]
    hidden = u.shape[1]
    block = _hidden_block(hidden)
    pl = pallas_module()
    head = dict(norm_eps=float(norm_eps), hidden_block=block, n_hidden_blocks=hidden // block)
    gates = [slot, evict.astype(jnp.int32), q, ring_k, ring_v, beta] + ([] if g is None else [g])
    common = dict(group=hq // hkv, has_decay=g is not None, gathered=not gather_in_kernel, scale=float(scale), cdt=cdt)
    y_shape = jax.ShapeDtypeStruct((bsz, hq * d), cdt)
    if block_v is None:
        args = gates + [u, g_proj, o_norm, o_proj, state.astype(F32)]
        y, new_state = pl.pallas_call(
            functools.partial(_kernel, **common, **head), grid=(bsz, hq), interpret=interpret,
            name="fused_delta_decode", out_shape=(y_shape, jax.ShapeDtypeStruct((bsz, hq, d, d), F32)),
            input_output_aliases={len(args) - 1: 1}, compiler_params=triton_params(NUM_WARPS, 1))(*args)
        return y, new_state
    _check_block_v(block_v, d)
    args = gates + [state.astype(F32)]
    o, new_state = pl.pallas_call(
        functools.partial(_state_kernel, **common, block_v=block_v), grid=(bsz, hq, d // block_v),
        interpret=interpret, name="fused_delta_decode_state",
        out_shape=(jax.ShapeDtypeStruct((bsz, hq, d), cdt), jax.ShapeDtypeStruct((bsz, hq, d, d), F32)),
        input_output_aliases={len(args) - 1: 1}, compiler_params=triton_params(SPLIT_STATE_WARPS, 1))(*args)
    y = pl.pallas_call(
        functools.partial(_head_kernel, cdt=cdt, **head), grid=(bsz, hq), interpret=interpret,
        name="fused_delta_decode_head",
        out_shape=y_shape, compiler_params=triton_params(NUM_WARPS, 1))(
        evict.astype(jnp.int32), o, u, g_proj, o_norm, o_proj)
    return y, new_state


def fused_delta_decode_columns(state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm, o_proj, *, scale,
                               norm_eps, compute_dtype=None, block_v=COLUMN_BLOCK, gather_in_kernel=True,
                               interpret=None):
    """The column form of fused_delta_decode (module docstring): the same step over (B, Hq, D / block_v) programs, one
    kernel, the head finished by XLA. Arguments and the result as in fused_delta_decode."""
    bsz, hq, d = q.shape
    cdt, interpret, slot, ring_k, ring_v, beta, g = _prepare(
        state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm, o_proj, compute_dtype, gather_in_kernel,
        interpret)
    hkv = ring_k.shape[1]
    _check_block_v(block_v, d)
    nj = d // block_v
    args = [slot, evict.astype(jnp.int32), q, ring_k, ring_v, beta] + ([] if g is None else [g]) + [
        u, g_proj, o_norm, o_proj, state.astype(F32)]
    block = _hidden_block(u.shape[1])
    ss, py, new_state = pallas_module().pallas_call(
        functools.partial(_column_kernel, group=hq // hkv, has_decay=g is not None, gathered=not gather_in_kernel,
                          scale=float(scale), cdt=cdt, block_v=block_v, hidden_block=block,
                          n_hidden_blocks=u.shape[1] // block),
        grid=(bsz, hq, nj), interpret=interpret, name="fused_delta_decode_columns",
        out_shape=(jax.ShapeDtypeStruct((bsz, hq, nj, 8), F32), jax.ShapeDtypeStruct((bsz, hq, nj, d), F32),
                   jax.ShapeDtypeStruct((bsz, hq, d, d), F32)),
        input_output_aliases={len(args) - 1: 2}, compiler_params=triton_params(COLUMN_WARPS, 1))(*args)
    gamma = _rnd(jnp.sum(ss[..., 1], axis=2), cdt)  # u . g_proj[:, h] as the XLA path rounds it
    scale_h = lax.rsqrt(jnp.sum(ss[..., 0], axis=2) / d + norm_eps) * (gamma / (1.0 + jnp.exp(-gamma)))  # rms, silu
    y = jnp.sum(py, axis=2) * scale_h[..., None]
    y = jnp.where(evict[:, None, None], y, 0.0).astype(cdt)
    return y.reshape(bsz, hq * d), new_state


def _prepare(state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm, o_proj, compute_dtype,
             gather_in_kernel, interpret):
    """Shared by the fused forms: shape checks, the compute dtype, interpret mode, int32 slots and (gather_in_kernel
    False) the evicted rows gathered by XLA -> (cdt, interpret, slot, ring_k, ring_v, beta, g)."""
    _check_step(state, q, ring_k, ring_v, beta, g, slot, evict, o_norm, o_proj)
    _check_u(u, g_proj, q.shape[0], q.shape[1])
    cdt = jnp.dtype(q.dtype if compute_dtype is None else compute_dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    slot = slot.astype(jnp.int32)
    if not gather_in_kernel:
        ring_k, ring_v, beta, g = _gather_evicted(ring_k, ring_v, beta, g, slot)
    return cdt, interpret, slot, ring_k, ring_v, beta, g


def _check_u(u, g_proj, bsz, hq):
    if u.ndim != 2 or u.shape[0] != bsz or g_proj.shape != (u.shape[1], hq):
        raise ValueError(f"fused_delta_decode: u must be [B={bsz}, hidden] and g_proj [hidden, Hq={hq}]; got u "
                         f"{u.shape}, g_proj {g_proj.shape}")


def _check_block_v(block_v, d):
    if not isinstance(block_v, int) or block_v < 1 or d % block_v:
        raise ValueError(f"fused_delta_decode: block_v must be an int dividing D={d}, got {block_v!r}")


def _gather_evicted(ring_k, ring_v, beta, g, slot):
    """XLA gathers the evicted rows; the kernel reads index 0 of a 1-slot "ring"."""
    rows = jnp.arange(slot.shape[0])
    ring_k, ring_v = ring_k[rows, :, slot][:, :, None], ring_v[rows, :, slot][:, :, None]
    return ring_k, ring_v, beta[rows, slot][:, None], None if g is None else g[rows, slot][:, None]


def _check_step(state, q, ring_k, ring_v, beta, g, slot, evict, o_norm, o_proj):
    """Shape checks shared by the fused forms (errors name the tensor)."""
    bsz, hq, d = q.shape
    if ring_k.ndim != 4 or ring_v.shape != ring_k.shape or ring_k.shape[0] != bsz or ring_k.shape[3] != d \
            or hq % ring_k.shape[1]:
        raise ValueError(f"fused_delta_decode: ring_k, ring_v must be [B={bsz}, Hkv, R, D={d}] with Hq={hq} a "
                         f"multiple of Hkv; got ring_k {ring_k.shape}, ring_v {ring_v.shape}")
    ring = ring_k.shape[2]
    if state.shape != (bsz, hq, d, d):
        raise ValueError(f"fused_delta_decode: state must be [B, Hq, D, D] = {(bsz, hq, d, d)}, got {state.shape}")
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and x.shape != (bsz, ring, hq):
            raise ValueError(f"fused_delta_decode: {name} must be [B, R, Hq] = {(bsz, ring, hq)}, got {x.shape}")
    if slot.shape != (bsz,) or evict.shape != (bsz,):
        raise ValueError(f"fused_delta_decode: slot and evict must be [B={bsz}], got {slot.shape}, {evict.shape}")
    if o_norm.shape != (d,) or o_proj.shape != (hq, d, d):
        raise ValueError(f"fused_delta_decode: o_norm must be [D={d}] and o_proj [Hq, D, D] = {(hq, d, d)}; got "
                         f"{o_norm.shape}, {o_proj.shape}")
