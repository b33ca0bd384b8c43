"""Sliding-window + sink attention as Mosaic GPU kernels (Hopper: wgmma, TMA, warp specialisation), forward and
backward (`forward`, `backward`; wired in through pallas_kernels.swa_attention's forward= / backward= switches).

Same function as pallas_kernels.swa_attention's Triton kernels (query t sees key j iff j <= t and (t - j < window or
j < sinks)) with the same (o, lse) layout, so either forward combines with either backward. Why a second set: the
Triton lowering issues no warp-specialised wgmma pipeline and tops out near 400 TFLOP/s on the H100
(benchmarks/NOTES_swa.md); this is the FlashAttention-3 design, written for the window and the sinks.

The forward (the backward's kernels are described above `MgpuBwdConfig`):

A tile is 128 query rows of one query head; a CTA handles one tile, or on a persistent grid (MgpuConfig.
persistent_ctas, FORWARD_PERSISTENT) every num_ctas-th tile with its K/V ring streaming across them (and, with
q_buffers=2, the next tile's Q loading while this one runs). Three warpgroups:
  - two compute warpgroups, 64 query rows each: S = Q K^T (wgmma, accumulators in registers), online softmax in
    log2 units, O += P V (wgmma with P from registers). They take turns on the tensor cores through a shared
    "schedule" barrier so one warpgroup's softmax overlaps the other's matmuls;
  - one memory warpgroup that streams the K/V blocks with TMA into a ring of `stages` shared-memory slots
    (ready barriers: TMA done; free barriers: both compute warpgroups finished with the slot).
The CTA's key blocks are one list: the sink blocks [0, n_sink), then the window blocks [win_lo, win_hi) of its
128 rows. Both compute warpgroups walk the whole list (so the barrier counts match); each splits it into masked
and unmasked ranges for its own 64 rows, so only edge blocks pay for the mask. A warpgroup's rows see up to
block_kv keys it cannot use at the window's two ends (about 64 / W of extra work).

Constraints (checked by the caller): bf16/f16, D 64 or 128, padded length a multiple of 128 and of block_kv.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

ROWS_PER_WG = 64  # wgmma's M per warpgroup
COMPUTE_WGS = 2
ROWS_PER_CTA = ROWS_PER_WG * COMPUTE_WGS
DEFAULT_BLOCK_KV = 128
DEFAULT_STAGES = 2
DEFAULT_STAGES_BWD = 3  # both backward kernels' rings: 3 beat 2 by ~3 % with the paired dk/dv accumulations
# Module switches read when swa_attention builds its configuration (so a benchmark can compare variants without more
# keywords). FORWARD_PERSISTENT: the forward on a persistent grid of one CTA per SM: True, False, or "auto" = for
# windows up to PERSISTENT_MAX_WINDOW. FORWARD_Q_BUFFERS: 2 = on a persistent grid the next tile's Q loads while this
# tile runs (MgpuConfig.q_buffers; where shared memory holds it), 1 = not. H100, 7 interleaved timings, median vs
# cuDNN at W = 1024 / 2048 / 4096 / 8192: one CTA per tile 1.12 / 1.01 / 0.98 / 0.98x, persistent 1.06 / 1.04 /
# 0.99 / 0.99x, persistent with 2 Q buffers 1.00 / 1.00 / 0.97 / 0.95x (benchmarks/RESULTS.md, seventh round): the
# last is the default at every window. Before the Q buffers "auto" (persistent up to 2048) was the default.
# MgpuBwdConfig's schedule_dq / schedule_dkv / paired_dkv: ping-pong measured 2-5 % slower, pairing 1.5 % faster.
FORWARD_PERSISTENT = True
PERSISTENT_MAX_WINDOW = 2048
FORWARD_Q_BUFFERS = 2
SMEM_BYTES = 227 * 1024  # the H100's shared memory per CTA
BWD_SCHEDULE_DQ = False
BWD_SCHEDULE_DKV = False
BWD_PAIRED_DKV = True
# BWD_FUSED_DQ: the dk/dv kernel also accumulates dq (TMA reduce-adds of float32 partials), no dq kernel: True,
# False, or "auto" = where the head dim allows it (fused_dq_supported). Off: correct, but measured slower on the H100
# (W=4096 fwd+bwd 9.6-9.9 ms vs 8.0-8.6 with the dq kernel; benchmarks/RESULTS.md, fifth round).
BWD_FUSED_DQ = False
# BWD_DKV_REGISTERS: per-thread registers of the dk/dv kernel's compute warpgroups (232 or 240; the memory warpgroup
# gets the rest of the 512 per thread slot: 40 or 24). ptxas spills fewer bytes at 240 (116 vs 164 stores, H100).
BWD_DKV_REGISTERS = 240
# BWD_DKV_SPLIT: CTAs per key block in the dk/dv kernel (MgpuBwdConfig.dkv_split), each walking a share of the block's
# query blocks; the wrapper sums the float32 shares. Its CTAs fill the SMs one at a time and are few and long (at
# W=8192: ~520 CTAs of ~130 steps x 8 heads on 132 SMs), so the last wave leaves SMs idle; shorter shares even it out.
# An int, or "auto": auto_dkv_split(window).
BWD_DKV_SPLIT = "auto"


def auto_dkv_split(window: int) -> int:
    """Shares per dk/dv key block by window, from the H100 (B1 T32768 Hq16 Hkv2 D128, 128 sinks; fwd+bwd / cuDNN,
    medians of 3 interleaved repetitions, shares 1 / 2 / 3 / 4): W=1024 1.057 / 0.983 / 0.997 / 1.022, W=4096 1.067 /
    1.066 / 1.084 / 1.082, W=8192 1.109 / 1.095 / 1.067 / 1.090 (benchmarks/RESULTS.md, sixth round). Windows between
    take the nearer measured window's choice; other batch sizes, lengths and head counts change the CTA count and
    were not measured."""
    if window <= 2048:
        return 2
    return 1 if window < 6144 else 3
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    window: int
    sinks: int
    scale: float
    block_kv: int = DEFAULT_BLOCK_KV
    stages: int = DEFAULT_STAGES  # K/V ring depth
    schedule_barrier: bool = True  # ping-pong the two compute warpgroups on the tensor cores
    persistent_ctas: int = 0  # > 0: at most this many CTAs, each walking several tiles (the SM count); 0: one per tile
    # Q/O shared-memory buffers per compute warpgroup. 2 (persistent grids): the next tile's Q is loaded while this
    # tile runs and its O store is not waited for, so a tile change costs no TMA round trip (64 KB more shared memory).
    q_buffers: int = 1
    interpret: bool = False


def forward_q_buffers(persistent_ctas: int, block_kv: int, stages: int, d: int, itemsize: int = 2) -> int:
    """MgpuConfig.q_buffers per FORWARD_Q_BUFFERS: 2 on a persistent grid where the K/V ring and two Q/O (+ lse)
    buffers per compute warpgroup fit in shared memory, else 1."""
    if FORWARD_Q_BUFFERS == 1 or not persistent_ctas:
        return 1
    ring = 2 * stages * block_kv * d * itemsize
    q_and_lse = COMPUTE_WGS * 2 * ROWS_PER_WG * (d * itemsize + 4)
    return 2 if ring + q_and_lse <= SMEM_BYTES else 1


def supported(q, k, block_kv: int = 128) -> str | None:
    """None if the kernel handles these operands, else why not."""
    d = q.shape[-1]
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {q.dtype} (bf16 / f16 only)"
    if d not in (64, 128):  # 256 overflows shared memory with these tiles (lowering: 330 KB > 227 KB)
        return f"head_dim {d} (64 or 128)"
    if block_kv % 64:
        return f"block_kv {block_kv} (a multiple of 64)"
    return None


def hopper_gpu() -> bool:
    """Is the default device a Hopper GPU (compute capability 9.x: wgmma)? The kernels use Hopper instructions."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def sm_count() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 SXM when the runtime does not say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _interpret_params(interpret: bool):
    from pallas_kernels import compat

    return compat.mosaic_gpu_interpret_params() if interpret else None


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # lazy: pulls the Mosaic GPU backend

    return plgpu


def _pl():
    from jax.experimental import pallas as pl

    return pl


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def _step_plan(cta_q0, cfg: MgpuConfig):
    """The CTA's key-block list: n_sink sink blocks, then window blocks win_lo.. (all int32 scalars)."""
    bk = cfg.block_kv
    win_lo = lax.div(jnp.maximum(cta_q0 - cfg.window + 1, 0), bk)
    win_hi = lax.div(cta_q0 + ROWS_PER_CTA - 1, bk) + 1
    n_sink = jnp.minimum(-(-cfg.sinks // bk), win_lo)
    return n_sink, win_lo, win_hi


def _key_block(step, n_sink, win_lo):
    return jnp.where(step < n_sink, step, win_lo + step - n_sink)


def _query_side_ranges(q0, bk, n_sink, win_lo, win_hi, window):
    """A warpgroup's (rows [q0, q0 + 64)) split of its CTA's step list into (lo, hi, masked) step ranges: sinks
    (masked), window left edge (masked), middle (no mask), diagonal (masked). Window-full: the block's first key is
    >= q0 + 64 - window; causal-full: its last key is <= q0."""
    full_lo = jnp.clip(_cdiv(jnp.maximum(q0 + ROWS_PER_WG - window, 0), bk), win_lo, win_hi)
    full_hi = jnp.clip(lax.div(q0 + 1, bk), full_lo, win_hi)
    to_step = n_sink - win_lo  # the step of window block kb is kb + to_step
    n_steps = n_sink + win_hi - win_lo
    return ((0, n_sink, True), (n_sink, full_lo + to_step, True), (full_lo + to_step, full_hi + to_step, False),
            (full_hi + to_step, n_steps, True))


def _visible(t, j, window, sinks):
    return (j <= t) & ((t - j < window) | (j < sinks))


# The GPU interpreter of jax 0.10 (used by the CPU tests) has no transposed shared-memory views, no run_state and no
# register layouts, so there the products are plain float32-accumulating dots on the loaded tiles: the tests
# exercise everything else (the K/V pipeline and its barriers, the block lists, masks and the softmax).

def _products_bt(pairs, interpret: bool, while_running=lambda: None):
    """a @ b^T (float32) for each (a, b) of `pairs`, operands in shared memory: every wgmma is issued before any is
    awaited, and `while_running` runs in between (the ping-pong hand-over)."""
    plgpu, pl = _plgpu(), _pl()
    if interpret:
        nt = (((1,), (1,)), ((), ()))
        out = tuple(lax.dot_general(a[...], b[...], nt, preferred_element_type=jnp.float32) for a, b in pairs)
        while_running()
        return out

    def products(refs):
        for ref, (a, b) in zip(refs, pairs):
            plgpu.wgmma(ref, a, plgpu.transpose_ref(b, (1, 0)))
        while_running()
        return tuple(ref[...] for ref in refs)

    return pl.run_scoped(products, tuple(plgpu.ACC((a.shape[0], b.shape[0]), jnp.float32) for a, b in pairs))


class _Transposed:
    """A [K, M] shared-memory ref used as the [M, K] left operand of a product (wgmma reads it transposed)."""

    def __init__(self, ref):
        self.ref = ref


def _accumulate(terms, interpret: bool):
    """acc + the sum of a @ b over each term's products: a term is (acc, a, b) or (acc, [(a, b), ...]); a in
    registers or _Transposed(shared-memory ref), b [K, N] in shared memory. The accumulators are preloaded into the
    wgmmas (pl.run_state); all are issued, then one wait."""
    plgpu, pl = _plgpu(), _pl()
    terms = [(t[0], [(t[1], t[2])]) if len(t) == 3 else t for t in terms]
    if interpret:
        value = lambda a: a.ref[...].T if isinstance(a, _Transposed) else a  # noqa: E731
        return tuple(acc + sum(jnp.dot(value(a), b[...], preferred_element_type=jnp.float32) for a, b in products)
                     for acc, products in terms)

    def accumulate(refs):
        for ref, (_, products) in zip(refs, terms):
            for a, b in products:
                plgpu.wgmma(ref, plgpu.transpose_ref(a.ref, (1, 0)) if isinstance(a, _Transposed) else a, b)

    return pl.run_state(accumulate)(tuple(plgpu.ACC.init(acc) for acc, _ in terms))


class _Regs:
    """Register-layout helpers: WGMMA layouts on the GPU, plain arrays in the interpreter (it has no layouts)."""

    def __init__(self, interpret: bool):
        self.interpret = interpret
        self.plgpu = _plgpu()

    def zeros(self, shape, fill=0.0):
        x = jnp.full(shape, fill, jnp.float32)
        if self.interpret:
            return x
        layout = self.plgpu.Layout.WGMMA if len(shape) == 2 else self.plgpu.Layout.WGMMA.reduce(1)
        return self.plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return self.plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.plgpu.Layout.WGMMA)

    def load_vector(self, ref, vector_dim):
        """A [n] float32 vector from shared memory, laid out to run along dimension `vector_dim` of a wgmma tile."""
        if self.interpret:
            return ref[...]
        from pallas_kernels import compat

        return compat.mosaic_gpu_load(ref, self.plgpu.Layout.WGMMA.reduce(1 - vector_dim))


class _PingPong:
    """The two compute warpgroups take turns on the tensor cores: each step hands over once its products are
    issued (`turn`) and again once its elementwise work is done (`done_elementwise` ... `wait_turn`); warpgroup 1
    starts half a step late (`begin`) and warpgroup 0 makes up the arrival at the end (`end`)."""

    def __init__(self, barrier, wg, enabled: bool):
        self.barrier, self.wg, self.enabled = barrier, wg, enabled

    def turn(self):
        if self.enabled:
            _plgpu().barrier_arrive(self.barrier)
            _plgpu().barrier_wait(self.barrier)

    def done_elementwise(self):
        if self.enabled:
            _plgpu().barrier_arrive(self.barrier)

    def wait_turn(self):
        if self.enabled:
            _plgpu().barrier_wait(self.barrier)

    def begin(self):
        if self.enabled:
            _pl().when(self.wg == 1)(self.turn)

    def end(self):
        if self.enabled:
            _pl().when(self.wg == 0)(self.turn)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch, *, cfg: MgpuConfig, group: int, num_ctas: int):
    """One CTA walks the tiles (query head, 128-row block, sequence) cta, cta + num_ctas, ...: with num_ctas = the
    number of tiles that is one tile per CTA; with fewer (persistent), the K/V ring keeps streaming across a CTA's
    tiles, so only the first tile waits for it to fill."""
    plgpu, pl = _plgpu(), _pl()
    (qo_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), (k_free, v_free), sched = scratch
    bk, stages = cfg.block_kv, cfg.stages
    b, tp, hq, d = q_ref.shape
    n_q_tiles = tp // ROWS_PER_CTA
    cta = lax.axis_index("cta")
    my_tiles = lax.div(b * hq * n_q_tiles - cta + num_ctas - 1, num_ctas)
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    c = cfg.scale * _LOG2E  # scores in log2 units; exp2(s * c - m) is one FMA + exp2

    def tile_plan(i):
        """The i-th tile of this CTA: (head, sequence, first row, n_sink, win_lo, win_hi, steps); heads vary
        fastest, so CTAs running together share their K/V windows in L2."""
        tile = cta + i * num_ctas
        head, rest = lax.rem(tile, hq), lax.div(tile, hq)
        cta_q0 = lax.rem(rest, n_q_tiles) * ROWS_PER_CTA
        n_sink, win_lo, win_hi = _step_plan(cta_q0, cfg)
        return head, lax.div(rest, n_q_tiles), cta_q0, n_sink, win_lo, win_hi, n_sink + win_hi - win_lo

    nq = cfg.q_buffers

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        regs = _Regs(cfg.interpret)  # loop carries in the layouts the wgmma results come in
        pp = _PingPong(sched, wg, cfg.schedule_barrier)

        def load_q(i, buf):
            head, batch, cta_q0 = tile_plan(i)[:3]
            rows = pl.ds(cta_q0 + wg * ROWS_PER_WG, ROWS_PER_WG)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], qo_smem.at[wg, buf], q_ready.at[wg * nq + buf])

        if nq == 2:
            load_q(0, 0)
        pp.begin()

        def one_tile(i, base):  # base: ring steps taken before this tile
            head, batch, cta_q0, n_sink, win_lo, win_hi, n_steps = tile_plan(i)
            q0 = cta_q0 + wg * ROWS_PER_WG
            buf = lax.rem(i, nq)
            q_smem, lse_buf = qo_smem.at[wg, buf], lse_smem.at[wg, buf]
            if nq == 1:
                load_q(i, buf)
            plgpu.barrier_wait(q_ready.at[wg * nq + buf])
            if nq == 2:
                @pl.when(i + 1 < my_tiles)
                def _prefetch():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # tile i - 1's O / lse left the other buffer
                    load_q(i + 1, 1 - buf)

            def step(s, carry, masked):
                acc, m, l = carry
                slot = lax.rem(base + s, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                scores, = _products_bt([(q_smem, k_smem.at[slot])], cfg.interpret, pp.turn)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    shape = (ROWS_PER_WG, bk)
                    t = q0 + regs.iota(shape, 0)
                    j = _key_block(s, n_sink, win_lo) * bk + regs.iota(shape, 1)
                    scores = jnp.where(_visible(t, j, cfg.window, cfg.sinks), scores, -jnp.inf)
                m_new = jnp.maximum(m, scores.max(axis=1) * c)
                if masked:  # a row that has seen nothing yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
                    m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                else:
                    m_new_safe = m_new
                alpha = jnp.exp2(m - m_new_safe)
                p = jnp.exp2(scores * c - lax.broadcast_in_dim(m_new_safe, scores.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                pp.done_elementwise()
                plgpu.barrier_wait(v_ready.at[slot])
                pp.wait_turn()

                acc, = _accumulate([(acc, p16, v_smem.at[slot])], cfg.interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (regs.zeros((ROWS_PER_WG, d)), regs.zeros((ROWS_PER_WG,), -jnp.inf), regs.zeros((ROWS_PER_WG,)))
            for lo, hi, masked in _query_side_ranges(q0, bk, n_sink, win_lo, win_hi, cfg.window):
                carry = lax.fori_loop(lo, hi, functools.partial(step, masked=masked), carry)
            acc, m, l = carry
            # Every row sees at least its own key, so l > 0 (padded rows too: they see themselves).
            acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
            q_smem[...] = acc.astype(dtype)  # O takes Q's place: every product with Q is done
            lse_buf[...] = (m + jnp.log2(l)) * _LN2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q0, ROWS_PER_WG), head])
            plgpu.copy_smem_to_gmem(lse_buf, lse_ref.at[batch, head, pl.ds(q0, ROWS_PER_WG)])
            if nq == 1:
                plgpu.wait_smem_to_gmem(0)  # the next tile's q lands in the same buffer
            return base + n_steps

        lax.fori_loop(0, my_tiles, one_tile, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)
        pp.end()

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def tile_steps(i):
            head, batch, _, n_sink, win_lo, _, n_steps = tile_plan(i)
            return n_steps, functools.partial(_load_key_block, k_ref, v_ref, (k_smem, v_smem), (k_ready, v_ready),
                                              batch, lax.div(head, group), n_sink, win_lo, bk)

        _stream(my_tiles, tile_steps, stages, (k_free, v_free))


def forward(q, k, v, cfg: MgpuConfig):
    """Padded q [B, Tp, Hq, D], k/v [B, Tp, Hkv, D] -> (o [B, Tp, Hq, D], lse [B, Hq, Tp] float32, natural log)."""
    plgpu, pl = _plgpu(), _pl()
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    if tp % ROWS_PER_CTA or tp % cfg.block_kv:
        raise ValueError(f"swa_attention_mgpu: padded length {tp} must be a multiple of {ROWS_PER_CTA} and "
                         f"block_kv={cfg.block_kv}")
    why = supported(q, k, cfg.block_kv)
    if why:
        raise ValueError(f"swa_attention_mgpu: unsupported {why}")
    if cfg.q_buffers not in (1, 2):
        raise ValueError(f"swa_attention_mgpu: q_buffers must be 1 or 2, got {cfg.q_buffers}")
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    bk, stages = cfg.block_kv, cfg.stages

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scratch: _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch, cfg=cfg,
                                             group=hq // hkv, num_ctas=num_ctas),
            (
                plgpu.SMEM((COMPUTE_WGS, cfg.q_buffers, ROWS_PER_WG, d), q.dtype, transforms=swizzled),
                plgpu.SMEM((stages, bk, d), k.dtype, transforms=swizzled),
                plgpu.SMEM((stages, bk, d), v.dtype, transforms=swizzled),
                plgpu.SMEM((COMPUTE_WGS, cfg.q_buffers, ROWS_PER_WG), jnp.float32),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=COMPUTE_WGS * cfg.q_buffers),
            ),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    interpret = _interpret_params(cfg.interpret)
    num_tiles = hq * (tp // ROWS_PER_CTA) * b
    num_ctas = min(num_tiles, cfg.persistent_ctas) if cfg.persistent_ctas else num_tiles
    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v)
    return o, lse


# ---------------------------------------------------------------------------------------------------------- backward
#
# Two kernels, as in the Triton backward (7 matmuls per visible tile pair; the atomic-dq form lost 3-4x there):
#   dq    the forward's CTA shape and key list; per key block s = q k^T and dp = do v^T, ds = p (dp - delta),
#         dq += ds k.
#   dk/dv a CTA owns 128 keys of one KV head (64 per compute warpgroup, dk/dv accumulators in registers) and walks the
#         query blocks that see them, for each of the `group` query heads in turn (GQA without repeating K/V); a
#         memory warpgroup streams q, do, lse, delta. Transposed tiles (keys x queries): s^T = k q^T, dp^T = v do^T,
#         dv += p^T do, dk += ds^T q. Sink key blocks are seen by every later query: their tail of query blocks is cut
#         into chunks handled by extra CTAs writing partial sums to extra rows, added back by the wrapper (the Triton
#         backward's scheme, with its helpers).
# fused_dq (off by default: measured slower): no dq kernel; the dk/dv kernel stores each step's ds^T in shared memory
#         (both warpgroups' halves), each warpgroup computes dq for half of D's columns over all 128 keys and TMA
#         reduce-adds the float32 [64, D/2] tile into a zeroed dq accumulator (an aliased input).

KEYS_PER_CTA = ROWS_PER_CTA


@dataclasses.dataclass(frozen=True)
class MgpuBwdConfig:
    window: int
    sinks: int
    scale: float
    block_kv_dq: int = 64  # the dq kernel's key tile
    stages_dq: int = DEFAULT_STAGES_BWD
    block_q_dkv: int = 64  # the dk/dv kernel's query tile
    stages_dkv: int = DEFAULT_STAGES_BWD
    schedule_dq: bool = False  # ping-pong the compute warpgroups on the tensor cores (as the forward does)
    schedule_dkv: bool = False
    paired_dkv: bool = True  # dk/dv kernel: issue the dv and dk accumulations together, one wait
    fused_dq: bool = False  # dq accumulated by the dk/dv kernel (no dq kernel; dv, dk, dq issued together whatever
    # paired_dkv says); see fused_dq_supported
    dkv_registers: int = BWD_DKV_REGISTERS  # the dk/dv kernel's compute warpgroups' registers (232 or 240)
    dkv_split: int = 1  # CTAs per key block of the dk/dv kernel, each walking a share of its query blocks
    interpret: bool = False


def _memory_registers(compute_registers: int) -> int:
    """The memory warpgroup's share: 2 compute warpgroups + 1 memory warpgroup within 512 registers per thread."""
    return {232: 40, 240: 24}[compute_registers]


def fused_dq_supported(d: int, block_q_dkv: int, interpret: bool) -> bool:
    """Can the dk/dv kernel accumulate dq? Each compute warpgroup owns half of dq's columns, and on the GPU a half
    must be whole 64-column swizzle tiles (D 128); the interpreter has no tiles. Query tiles of 64 only (128 would
    overflow shared memory and need M = 128 per warpgroup)."""
    return block_q_dkv == 64 and (interpret or (d // COMPUTE_WGS) % 64 == 0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dq_ref, scratch, *, cfg: MgpuBwdConfig, group):
    plgpu, pl = _plgpu(), _pl()
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem), (q_ready, do_ready, lse_ready, delta_ready), \
        (k_ready, v_ready), (k_free, v_free), sched = scratch
    bk, stages = cfg.block_kv_dq, cfg.stages_dq
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_q0 = lax.axis_index("q_tiles") * ROWS_PER_CTA
    plan = MgpuConfig(window=cfg.window, sinks=cfg.sinks, scale=cfg.scale, block_kv=bk)
    n_sink, win_lo, win_hi = _step_plan(cta_q0, plan)
    n_steps = n_sink + win_hi - win_lo
    c = cfg.scale * _LOG2E
    d = q_ref.shape[-1]

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        regs = _Regs(cfg.interpret)
        q0 = cta_q0 + wg * ROWS_PER_WG
        rows = (batch, pl.ds(q0, ROWS_PER_WG), head)
        vec = (batch, head, pl.ds(q0, ROWS_PER_WG))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[wg], q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[wg], do_ready.at[wg])
        plgpu.copy_gmem_to_smem(lse2_ref.at[vec], lse_smem.at[wg], lse_ready.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[wg], delta_ready.at[wg])
        for ready in (q_ready, do_ready, lse_ready, delta_ready):
            plgpu.barrier_wait(ready.at[wg])
        lse2 = regs.load_vector(lse_smem.at[wg], 0)
        delta = regs.load_vector(delta_smem.at[wg], 0)
        pp = _PingPong(sched, wg, cfg.schedule_dq)

        def step(s, carry, masked):
            dq, lse2, delta = carry  # carried, not closed over: Mosaic GPU infers no layout for loop constants
            slot = lax.rem(s, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            scores, dp = _products_bt([(q_smem.at[wg], k_smem.at[slot]), (do_smem.at[wg], v_smem.at[slot])],
                                      cfg.interpret, pp.turn)
            plgpu.barrier_arrive(v_free.at[slot])
            p = jnp.exp2(scores * c - lax.broadcast_in_dim(lse2, scores.shape, [0]))
            if masked:
                shape = (ROWS_PER_WG, bk)
                t = q0 + regs.iota(shape, 0)
                j = _key_block(s, n_sink, win_lo) * bk + regs.iota(shape, 1)
                p = jnp.where(_visible(t, j, cfg.window, cfg.sinks), p, 0.0)
            ds = (p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))).astype(k_smem.dtype)
            pp.done_elementwise()
            pp.wait_turn()
            dq, = _accumulate([(dq, ds, k_smem.at[slot])], cfg.interpret)
            plgpu.barrier_arrive(k_free.at[slot])
            return dq, lse2, delta

        carry = (regs.zeros((ROWS_PER_WG, d)), lse2, delta)
        pp.begin()
        for lo, hi, masked in _query_side_ranges(q0, bk, n_sink, win_lo, win_hi, cfg.window):
            carry = lax.fori_loop(lo, hi, functools.partial(step, masked=masked), carry)
        pp.end()
        dq = carry[0]
        q_smem.at[wg][...] = (dq * cfg.scale).astype(q_smem.dtype)  # q is no longer read: stage dq there
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        _stream_key_blocks(k_ref, v_ref, (k_smem, v_smem), (k_ready, v_ready), (k_free, v_free), batch,
                           lax.div(head, group), n_sink, win_lo, n_steps, bk, stages)


def _stream_key_blocks(k_ref, v_ref, smem, ready, free, batch, kv_head, n_sink, win_lo, n_steps, bk, stages):
    """Memory warpgroup of the dq kernel: its CTA's key list's K/V blocks into the ring."""
    _plgpu().set_max_registers(40, action="decrease")
    load = functools.partial(_load_key_block, k_ref, v_ref, smem, ready, batch, kv_head, n_sink, win_lo, bk)
    _stream(1, lambda _: (n_steps, load), stages, free)


def _load_key_block(k_ref, v_ref, smem, ready, batch, kv_head, n_sink, win_lo, bk, s, slot):
    """TMA the K and V blocks of key-list step s into ring slot `slot`."""
    plgpu, pl = _plgpu(), _pl()
    rows = (batch, pl.ds(_key_block(s, n_sink, win_lo) * bk, bk), kv_head)
    for ref, buf, barrier in zip((k_ref, v_ref), smem, ready):
        plgpu.copy_gmem_to_smem(ref.at[rows], buf.at[slot], barrier.at[slot])


def _stream(n_tiles, tile_steps, stages, free_barriers):
    """The memory warpgroup's loop over its CTA's tiles: tile_steps(i) -> (steps, load(s, slot)). Ring step g (counted
    across tiles) goes to slot g % stages once both compute warpgroups released that slot's previous use; at the end
    it waits out the last releases (so every barrier phase is observed: the GPU interpreter checks it)."""
    plgpu, pl = _plgpu(), _pl()

    def wait_free(g):
        for free in free_barriers:
            plgpu.barrier_wait(free.at[lax.rem(g, stages)])

    def one_tile(i, base):
        n_steps, load = tile_steps(i)

        @pl.loop(0, n_steps)
        def _step(s):
            g = base + s
            pl.when(g >= stages)(lambda: wait_free(g))
            load(s, lax.rem(g, stages))

        return base + n_steps

    total = lax.fori_loop(0, n_tiles, one_tile, jnp.int32(0))

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _drain(g):
        wait_free(g)


def _reduce_add(value, stage, dst, loaded, interpret: bool):
    """dst (global memory) += value through the shared-memory tile `stage`: a TMA bulk reduce-add, which many CTAs
    may aim at the same dst. It is waited for only when `stage` is next needed (here, the next step). The GPU
    interpreter has no TMA reductions: there it is a read-modify-write, exact because it runs CTAs one after another
    and the two warpgroups own different columns."""
    plgpu = _plgpu()
    if interpret:
        plgpu.copy_gmem_to_smem(dst, stage, loaded)
        plgpu.barrier_wait(loaded)
        stage[...] = stage[...] + value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, dst)
        plgpu.wait_smem_to_gmem(0)
        return
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous reduce-add has read the stage
    stage[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage, dst, reduction_op="add")


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, dq_ref, scratch, *,
                 cfg: MgpuBwdConfig, group: int, tp: int, num_k_blocks: int, n_split: int, split_len: int):
    """CTA j < dkv_split * num_k_blocks walks share j % dkv_split of key block j // dkv_split's query blocks and
    writes its float32 dk/dv to rows j * 128 (the wrapper sums the shares); later CTAs a split_len share of a sink
    block's tail. dq_ref: None, or (cfg.fused_dq) a float32 [B, Tp, Hq, D] accumulator, zero on entry, that each step
    adds its dq partial to (ds^T k over the CTA's 128 keys; each warpgroup owns half of D's columns)."""
    from pallas_kernels import swa_attention as tri  # its block-range helpers (same definitions as the Triton path)

    plgpu, pl = _plgpu(), _pl()
    (k_smem, v_smem, staging, q_smem, do_smem, lse_smem, delta_smem), (k_ready, v_ready), \
        (q_ready, do_ready, lse_ready, delta_ready), (q_free, do_free), sched, (ds_ready, dq_loaded) = scratch
    (ds_smem, dq_stage), out_smem = staging  # one region on the GPU: the loop's dq staging, then dk/dv's
    bq, stages = cfg.block_q_dkv, cfg.stages_dkv
    num_q_blocks = tp // bq
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    j = lax.axis_index("k_tiles")
    # Which key block, and which query blocks [lo, hi) (per head) this CTA walks.
    shares = cfg.dkv_split
    is_tail = j >= shares * num_k_blocks
    tail = jnp.maximum(j - shares * num_k_blocks, 0)
    kb = jnp.where(is_tail, lax.div(tail, max(n_split, 1)), lax.div(j, shares))
    lo, hi = tri._query_range_of_key_block(kb, cfg, bq, KEYS_PER_CTA, num_q_blocks)
    share_len = lax.div(hi - lo + shares - 1, shares)
    share_lo = lo + lax.rem(j, shares) * share_len
    q_tail = tri._sink_tail_start(cfg, bq, KEYS_PER_CTA, num_q_blocks)
    split_lo = q_tail + lax.rem(tail, max(n_split, 1)) * split_len
    lo = jnp.where(is_tail, split_lo, share_lo)
    hi = jnp.where(is_tail, jnp.minimum(split_lo + split_len, num_q_blocks), jnp.minimum(share_lo + share_len, hi))
    per_head = jnp.maximum(hi - lo, 0)
    n_steps = group * per_head
    c = cfg.scale * _LOG2E
    d = k_ref.shape[-1]

    def head_of(g):
        return kv_head * group + g

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(cfg.dkv_registers, action="increase")
        regs = _Regs(cfg.interpret)
        k0 = kb * KEYS_PER_CTA + wg * ROWS_PER_WG
        keys = (batch, pl.ds(k0, ROWS_PER_WG), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[wg], k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[wg], v_ready.at[wg])
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        pp = _PingPong(sched, wg, cfg.schedule_dkv)
        # This warpgroup's fully visible query blocks: causal for its last key, inside the window of its first key
        # for every query of the block (or all its keys are sinks).
        full_lo = jnp.clip(_cdiv(k0 + ROWS_PER_WG - 1, bq), lo, hi)
        window_full_hi = lax.div(k0 + cfg.window, bq)
        full_hi = jnp.clip(jnp.where(k0 + ROWS_PER_WG <= cfg.sinks, num_q_blocks, window_full_hi), full_lo, hi)

        def step(qb, carry, g, masked):
            dk, dv = carry
            s = g * per_head + qb - lo
            slot = lax.rem(s, stages)
            for ready in (q_ready, do_ready, lse_ready, delta_ready):
                plgpu.barrier_wait(ready.at[slot])
            scores_t, dp_t = _products_bt([(k_smem.at[wg], q_smem.at[slot]), (v_smem.at[wg], do_smem.at[slot])],
                                          cfg.interpret, pp.turn)
            lse2 = regs.load_vector(lse_smem.at[slot], 1)
            delta = regs.load_vector(delta_smem.at[slot], 1)
            p_t = jnp.exp2(scores_t * c - lax.broadcast_in_dim(lse2, scores_t.shape, [1]))
            if masked:
                shape = (ROWS_PER_WG, bq)
                key = k0 + regs.iota(shape, 0)
                t = qb * bq + regs.iota(shape, 1)
                p_t = jnp.where(_visible(t, key, cfg.window, cfg.sinks), p_t, 0.0)
            ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(q_smem.dtype)
            if cfg.fused_dq:  # this warpgroup's 64 key rows of the step's ds^T, for both warpgroups' dq products
                ds_all = ds_smem.at[lax.rem(s, 2)]  # two buffers: the other warpgroup may still read the last one
                ds_all.at[wg][...] = ds_t
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready)
            pp.done_elementwise()
            pp.wait_turn()
            if cfg.fused_dq:  # dq (this warpgroup's columns) = ds (all 128 keys) k, issued with dv and dk
                plgpu.barrier_wait(ds_ready)
                # Its own keys, then the other warpgroup's: traced indices (static ones would enter run_state as
                # literals, which jax 0.11's Mosaic GPU lowering rejects).
                dq_products = [(_Transposed(ds_all.at[w]), k_smem.at[w, :, dq_cols]) for w in (wg, 1 - wg)]
                dv, dk, dq = _accumulate([(dv, p_t.astype(do_smem.dtype), do_smem.at[slot]),
                                          (dk, ds_t, q_smem.at[slot]), (regs.zeros((bq, dq_width)), dq_products)],
                                         cfg.interpret)
                plgpu.barrier_arrive(do_free.at[slot])
                _reduce_add(dq, dq_stage.at[wg], dq_ref.at[batch, pl.ds(qb * bq, bq), head_of(g), dq_cols],
                            dq_loaded.at[wg], cfg.interpret)
            elif cfg.paired_dkv:
                dv, dk = _accumulate([(dv, p_t.astype(do_smem.dtype), do_smem.at[slot]),
                                      (dk, ds_t, q_smem.at[slot])], cfg.interpret)
                plgpu.barrier_arrive(do_free.at[slot])
            else:
                dv, = _accumulate([(dv, p_t.astype(do_smem.dtype), do_smem.at[slot])], cfg.interpret)
                plgpu.barrier_arrive(do_free.at[slot])
                dk, = _accumulate([(dk, ds_t, q_smem.at[slot])], cfg.interpret)
            plgpu.barrier_arrive(q_free.at[slot])
            return dk, dv

        def head_steps(g, carry):
            for a, b, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
                carry = lax.fori_loop(a, b, functools.partial(step, g=g, masked=masked), carry)
            return carry

        dq_width = d // COMPUTE_WGS
        dq_cols = pl.ds(pl.multiple_of(wg * dq_width, dq_width), dq_width)
        zeros = regs.zeros((ROWS_PER_WG, d))
        pp.begin()
        dk, dv = lax.fori_loop(0, group, head_steps, (zeros, zeros))
        pp.end()
        if cfg.fused_dq:  # the staging region becomes out_smem: every reduce-add has read it, and no ds^T is in use
            plgpu.wait_smem_to_gmem(0)
            plgpu.barrier_arrive(ds_ready)
            plgpu.barrier_wait(ds_ready)
        out_rows = (batch, pl.ds(j * KEYS_PER_CTA + wg * ROWS_PER_WG, ROWS_PER_WG), kv_head)
        for value, ref in ((dk * cfg.scale, dk_ref), (dv, dv_ref)):  # one float32 staging tile, used twice
            out_smem.at[wg][...] = value
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], ref.at[out_rows])
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(_memory_registers(cfg.dkv_registers), action="decrease")

        def load(s, slot):
            g = lax.div(s, jnp.maximum(per_head, 1))
            qb = lo + s - g * per_head
            h = head_of(g)
            rows = (batch, pl.ds(qb * bq, bq), h)
            vec = (batch, h, pl.ds(qb * bq, bq))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse2_ref.at[vec], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], delta_ready.at[slot])

        _stream(1, lambda _: (n_steps, load), stages, (q_free, do_free))


def backward(q, k, v, o, lse, do, dlse, cfg: MgpuBwdConfig):
    """Padded tensors (lse [B, Hq, Tp] natural log, dlse its cotangent) -> (dq, dk, dv) in the input dtypes."""
    from pallas_kernels import swa_attention as tri

    plgpu, pl = _plgpu(), _pl()
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    if tp % KEYS_PER_CTA or tp % cfg.block_kv_dq or tp % cfg.block_q_dkv:
        raise ValueError(f"swa_attention_mgpu: padded length {tp} must be a multiple of {KEYS_PER_CTA} and the tiles")
    why = supported(q, k, cfg.block_kv_dq) or supported(q, k, cfg.block_q_dkv)
    if why:
        raise ValueError(f"swa_attention_mgpu: unsupported {why}")
    # delta_i = sum_d dO*O - dlse_i: the lse cotangent enters the softmax gradient as a per-row shift.
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    lse2 = lse * _LOG2E
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    interpret = _interpret_params(cfg.interpret)
    launch = dict(num_threads=COMPUTE_WGS + 1, thread_name="wg", interpret=interpret,
                  compiler_params=plgpu.CompilerParams(approx_math=True))

    def tiles(n, rows, dtype):
        return plgpu.SMEM((n, rows, d), dtype, transforms=swizzled)

    bk, sq = cfg.block_kv_dq, cfg.stages_dq
    wgs = COMPUTE_WGS

    def dq_entry(*refs):
        pl.run_scoped(
            lambda *scratch: _dq_kernel(*refs, scratch, cfg=cfg, group=group),
            (tiles(wgs, ROWS_PER_WG, q.dtype), tiles(wgs, ROWS_PER_WG, do.dtype),
             plgpu.SMEM((wgs, ROWS_PER_WG), jnp.float32), plgpu.SMEM((wgs, ROWS_PER_WG), jnp.float32),
             tiles(sq, bk, k.dtype), tiles(sq, bk, v.dtype)),
            (plgpu.Barrier(num_barriers=wgs),) * 4,
            (plgpu.Barrier(num_barriers=sq),) * 2,
            (plgpu.Barrier(num_arrivals=wgs, num_barriers=sq),) * 2,
            plgpu.Barrier(num_arrivals=wgs),
            collective_axes="wg",
        )

    fused = cfg.fused_dq
    if fused and not fused_dq_supported(d, cfg.block_q_dkv, cfg.interpret):
        raise ValueError(f"swa_attention_mgpu: fused_dq needs block_q_dkv 64 and head_dim 128 (got "
                         f"{cfg.block_q_dkv}, {d})")
    if not fused:
        dq = plgpu.kernel(dq_entry, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
                          grid=(hq, tp // ROWS_PER_CTA, b), grid_names=("heads", "q_tiles", "batch"),
                          **launch)(q, k, v, do, lse2, delta)

    bq, sk = cfg.block_q_dkv, cfg.stages_dkv
    num_q_blocks, num_k_blocks = tp // bq, tp // KEYS_PER_CTA
    nsb = tri._num_sink_blocks(cfg, KEYS_PER_CTA)
    q_tail = tri._sink_tail_start(cfg, bq, KEYS_PER_CTA, num_q_blocks)
    # The sink blocks' tails in shares of about one (split) key block's work: a window's query blocks / dkv_split.
    split_len = max(1, -(-(cfg.window + KEYS_PER_CTA) // (bq * cfg.dkv_split)))
    n_split = -(-(num_q_blocks - q_tail) // split_len) if nsb else 0
    n_extra = nsb * n_split
    shares = cfg.dkv_split
    rows = shares * tp + n_extra * KEYS_PER_CTA

    # The loop's dq staging (ds^T, two buffers; a float32 [bq, D/2] tile per warpgroup) and the final dk/dv staging
    # share shared memory on the GPU (a RefUnion: their lifetimes do not overlap); the interpreter has no RefUnion.
    # The float32 dq tile swizzled too: stored unswizzled, the WGMMA layout's 8 rows per store land in one bank group.
    swizzled_f32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    loop_staging = (plgpu.SMEM((2, wgs, ROWS_PER_WG, bq), q.dtype, transforms=swizzled),
                    plgpu.SMEM((wgs, bq, d // wgs), jnp.float32, transforms=swizzled_f32))
    out_staging = plgpu.SMEM((wgs, ROWS_PER_WG, d), jnp.float32)
    staging = (loop_staging, out_staging) if cfg.interpret else plgpu.RefUnion(loop_staging, out_staging)

    def dkdv_entry(*refs):
        if not fused:
            refs = refs + (None,)
        else:  # inputs, the dq accumulator's input (aliased to the output), outputs
            refs = refs[:6] + refs[7:]
        pl.run_scoped(
            lambda *scratch: _dkdv_kernel(*refs, scratch, cfg=cfg, group=group, tp=tp, num_k_blocks=num_k_blocks,
                                          n_split=n_split, split_len=split_len),
            (tiles(wgs, ROWS_PER_WG, k.dtype), tiles(wgs, ROWS_PER_WG, v.dtype),
             staging,
             tiles(sk, bq, q.dtype), tiles(sk, bq, do.dtype),
             plgpu.SMEM((sk, bq), jnp.float32), plgpu.SMEM((sk, bq), jnp.float32)),
            (plgpu.Barrier(num_barriers=wgs),) * 2,
            (plgpu.Barrier(num_barriers=sk),) * 4,
            (plgpu.Barrier(num_arrivals=wgs, num_barriers=sk),) * 2,
            plgpu.Barrier(num_arrivals=wgs),
            (plgpu.Barrier(num_arrivals=wgs), plgpu.Barrier(num_barriers=wgs)),
            collective_axes="wg",
        )

    out = jax.ShapeDtypeStruct((b, rows, hkv, d), jnp.float32)
    grid = dict(grid=(hkv, shares * num_k_blocks + n_extra, b), grid_names=("kv_heads", "k_tiles", "batch"))
    if fused:
        from pallas_kernels import compat

        dq_acc = jnp.zeros((b, tp, hq, d), jnp.float32)
        dk_all, dv_all, dq_acc = compat.mosaic_gpu_kernel_with_aliases(
            dkdv_entry, (out, out, jax.ShapeDtypeStruct(dq_acc.shape, jnp.float32)), input_output_aliases={6: 2},
            **grid, **launch)(q, k, v, do, lse2, delta, dq_acc)
        dq = (dq_acc * cfg.scale).astype(q.dtype)
    else:
        dk_all, dv_all = plgpu.kernel(dkdv_entry, out_type=(out, out), **grid, **launch)(q, k, v, do, lse2, delta)

    def fold(x_all):
        x = x_all[:, :shares * tp]
        if shares > 1:
            x = x.reshape(b, num_k_blocks, shares, KEYS_PER_CTA, hkv, d).sum(axis=2).reshape(b, tp, hkv, d)
        if n_extra:
            extra = x_all[:, shares * tp:].reshape(b, nsb, n_split, KEYS_PER_CTA, hkv, d).sum(axis=2)
            x = x.at[:, : nsb * KEYS_PER_CTA].add(extra.reshape(b, nsb * KEYS_PER_CTA, hkv, d))
        return x

    return dq, fold(dk_all).astype(k.dtype), fold(dv_all).astype(v.dtype)
