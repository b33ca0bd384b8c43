"""The Mosaic GPU forward of sliding-window + sinks attention (pallas_kernels/swa_attention_mgpu.py).

On CPU the kernel runs in jax's GPU interpreter: its warpgroups as threads, shared memory, TMA copies and barriers
simulated (a barrier phase a thread never observes is an error there). The interpreter has no transposed
shared-memory views, run_state or register layouts, so its two matrix products are plain dots (see the module): what
these tests check is the block lists, the K/V ring and its barriers, the masks, the softmax and the lse, against the
dense float32 reference of test_swa_attention. The wgmma form is checked by lowering for CUDA (below) and ran on an
H100 (benchmarks/bench_swa_mgpu.py checks it there before timing). Interpreted kernels are slow (~3 s per CTA and
head), so the shapes are small and most cases are in the slow suite.
"""

import pytest

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels import swa_attention_mgpu as mgpu
from pallas_kernels.swa_attention import swa_attention

from test_swa_attention import _assert_close, _dense_reference, _inputs


def _forward(q, k, v, window, sinks, **cfg):
    tile = max(mgpu.ROWS_PER_CTA, cfg.get("block_kv", mgpu.DEFAULT_BLOCK_KV))
    tp = -(-q.shape[1] // tile) * tile
    pad = ((0, 0), (0, tp - q.shape[1]), (0, 0), (0, 0))
    o, lse = mgpu.forward(*(jnp.pad(x, pad) for x in (q, k, v)),
                          mgpu.MgpuConfig(window=window, sinks=sinks, scale=q.shape[-1] ** -0.5, interpret=True,
                                          **cfg))
    return o[:, : q.shape[1]], jnp.swapaxes(lse[:, :, : q.shape[1]], 1, 2)


def _check_forward(seed, t, hq, hkv, window, sinks, **cfg):
    q, k, v, _, _ = _inputs(seed, 1, t, hq, hkv, 64, jnp.bfloat16)
    o, lse = jax.jit(lambda q, k, v: _forward(q, k, v, window, sinks, **cfg))(q, k, v)
    o_ref, lse_ref = _dense_reference(q, k, v, window, sinks)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32
    _assert_close("o", o, o_ref, 2e-2)  # bf16 output and bf16 probabilities into the second product
    _assert_close("lse", lse, lse_ref, 1e-5)


# Case list: window edge inside a warpgroup's rows, sinks overlapping the window, several sink blocks, window 1,
# window beyond T, T not a multiple of 128, a 3-deep ring, without the ping-pong schedule barrier, persistent grids.
@pytest.mark.parametrize(
    "t, hq, hkv, window, sinks, cfg",
    [
        (384, 2, 1, 100, 10, dict(block_kv=64)),
        # persistent grid with one Q buffer (the default before two): 4 tiles over 3 CTAs, the ring across tiles
        pytest.param(256, 2, 1, 70, 3, dict(persistent_ctas=3), marks=pytest.mark.slow),
        # Q double-buffered: 6 tiles over 2 CTAs, so each buffer is reused after its O store
        (384, 2, 1, 100, 10, dict(persistent_ctas=2, q_buffers=2)),
        pytest.param(640, 2, 1, 300, 130, dict(block_kv=64, stages=3, persistent_ctas=4), marks=pytest.mark.slow),
        pytest.param(300, 2, 2, 129, 130, dict(block_kv=128), marks=pytest.mark.slow),
        pytest.param(384, 1, 1, 1, 0, dict(block_kv=64, stages=3), marks=pytest.mark.slow),
        pytest.param(256, 2, 1, 1000, 1, dict(block_kv=128, schedule_barrier=False), marks=pytest.mark.slow),
        pytest.param(640, 1, 1, 64, 256, dict(block_kv=64), marks=pytest.mark.slow),
    ],
)
def test_forward_matches_dense_reference(t, hq, hkv, window, sinks, cfg):
    _check_forward(0, t, hq, hkv, window, sinks, **cfg)


def _check_backward(seed, t, hq, hkv, window, sinks, **cfg):
    """mgpu.backward's dq, dk, dv (with the lse cotangent) vs jax.vjp of the dense float32 reference."""
    q, k, v, _, _ = _inputs(seed, 1, t, hq, hkv, 64, jnp.bfloat16)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), 2)
    do = jax.random.normal(keys[0], q.shape, jnp.float32).astype(jnp.bfloat16)
    dlse = jax.random.normal(keys[1], (1, t, hq), jnp.float32)
    (o, lse), pull = jax.vjp(lambda q, k, v: _dense_reference(q, k, v, window, sinks), q, k, v)
    want = pull((do.astype(jnp.float32), dlse))
    tp = -(-t // mgpu.ROWS_PER_CTA) * mgpu.ROWS_PER_CTA
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    lse_h, dlse_h = (jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t))) for x in (lse, dlse))
    bwd_cfg = mgpu.MgpuBwdConfig(window=window, sinks=sinks, scale=64 ** -0.5, interpret=True, **cfg)
    got = jax.jit(lambda *a: mgpu.backward(*a, bwd_cfg))(pad(q), pad(k), pad(v), pad(o.astype(q.dtype)), lse_h,
                                                        pad(do), dlse_h)
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.dtype == x.dtype
        _assert_close(name, g[:, :t], w, 2e-2)


# Sinks spanning two 128-key blocks with a long query tail (the split tail CTAs and their fold), partial sink
# blocks, GQA 4, window 1 and beyond T, both dq key tiles, a 128-row dk/dv query tile, deeper rings; dq from its own
# kernel (the default) or accumulated by the dk/dv kernel (fused_dq: reduce-adds from several CTAs, the sink tail's
# CTAs among them, into one dq row block).
@pytest.mark.parametrize(
    "t, hq, hkv, window, sinks, cfg",
    [
        (256, 2, 1, 100, 10, dict()),
        pytest.param(256, 2, 1, 100, 10, dict(fused_dq=True), marks=pytest.mark.slow),
        pytest.param(640, 2, 1, 64, 256, dict(fused_dq=True), marks=pytest.mark.slow),
        pytest.param(512, 4, 1, 129, 130, dict(fused_dq=True, stages_dkv=2), marks=pytest.mark.slow),
        pytest.param(300, 2, 2, 1000, 1, dict(fused_dq=True), marks=pytest.mark.slow),
        pytest.param(384, 2, 1, 1, 0, dict(fused_dq=True), marks=pytest.mark.slow),
        pytest.param(640, 2, 1, 64, 256, dict(schedule_dq=True, schedule_dkv=True), marks=pytest.mark.slow),
        pytest.param(256, 8, 1, 100, 10, dict(), marks=pytest.mark.slow),  # GQA 8: eight heads per dk/dv CTA
        pytest.param(512, 4, 1, 129, 130, dict(block_kv_dq=128, stages_dq=2), marks=pytest.mark.slow),
        pytest.param(384, 2, 2, 1, 0, dict(stages_dq=2, stages_dkv=2, paired_dkv=False), marks=pytest.mark.slow),
        pytest.param(300, 2, 1, 1000, 1, dict(block_kv_dq=128, block_q_dkv=128, stages_dq=2, stages_dkv=2),
                     marks=pytest.mark.slow),
        # dk/dv CTAs in shares of a key block's query blocks (sink tails in matching shares; empty shares at T's end)
        pytest.param(640, 2, 1, 64, 256, dict(dkv_split=3), marks=pytest.mark.slow),
        pytest.param(300, 2, 2, 1000, 1, dict(dkv_split=2), marks=pytest.mark.slow),
        pytest.param(256, 2, 1, 100, 10, dict(dkv_split=4, fused_dq=True), marks=pytest.mark.slow),
    ],
)
def test_backward_matches_dense_reference(t, hq, hkv, window, sinks, cfg):
    _check_backward(3, t, hq, hkv, window, sinks, **cfg)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["triton", "mosaic"])
def test_mosaic_kernels_in_swa_attention_match_the_triton_path(backward):
    """swa_attention(forward="mosaic", backward=...) through its custom_vjp (padding, lse layout, the lse cotangent)
    equals the all-Triton path up to bf16 rounding."""
    q, k, v, w_o, w_lse = _inputs(1, 1, 200, 2, 1, 64, jnp.bfloat16)

    def loss_and_grads(forward, backward):
        def loss(q, k, v):
            o, lse = swa_attention(q, k, v, window=50, sinks=5, return_lse=True, forward=forward, backward=backward,
                                   interpret=True)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(lse * w_lse), (o, lse)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (grads, (o, lse)), (grads_t, (o_t, lse_t)) = loss_and_grads("mosaic", backward), loss_and_grads("triton", "triton")
    _assert_close("o", o, o_t, 1e-2)
    _assert_close("lse", lse, lse_t, 1e-5)
    for name, g, g_t in zip(("dq", "dk", "dv"), grads, grads_t):
        _assert_close(name, g, g_t, 2e-2)


def test_auto_picks_mosaic_only_on_hopper_for_supported_operands(monkeypatch):
    from pallas_kernels import swa_attention as tri

    bf, f32 = (_inputs(0, 1, 64, 2, 1, 64, dt)[:2] for dt in (jnp.bfloat16, jnp.float32))
    resolve = tri._resolve_auto
    common = dict(dq_mode="kernel", lazy_rescale=False, block_k=None, block_q_bwd=None, block_k_dq=None)
    assert resolve("auto", "auto", *bf, interpret=True, **common) == ("triton", "triton")  # CPU: interpret mode
    monkeypatch.setattr(mgpu, "hopper_gpu", lambda: True)
    assert resolve("auto", "auto", *bf, interpret=False, **common) == ("mosaic", "mosaic")
    assert resolve("auto", "auto", *f32, interpret=False, **common) == ("triton", "triton")  # bf16 / f16 only
    assert resolve("auto", "auto", *bf, interpret=False, **dict(common, lazy_rescale=True)) == ("triton", "mosaic")
    assert resolve("auto", "auto", *bf, interpret=False, **dict(common, dq_mode="atomic")) == ("mosaic", "triton")
    assert resolve("triton", "auto", *bf, interpret=False, **common) == ("triton", "mosaic")
    monkeypatch.setattr(mgpu, "hopper_gpu", lambda: False)
    assert resolve("auto", "auto", *bf, interpret=False, **common) == ("triton", "triton")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype=jnp.float32), "bf16 / f16"),
    (dict(d=32), "64 or 128"),
    (dict(d=256), "64 or 128"),
    (dict(block_k=32), "block_kv 32"),
    (dict(backward="mosaic", dtype=jnp.float32), "bf16 / f16"),
    (dict(backward="mosaic", dq_mode="atomic"), "dq_mode='kernel'"),
])
def test_unsupported_operands_raise(kwargs, message):
    d = kwargs.pop("d", 64)
    dtype = kwargs.pop("dtype", jnp.bfloat16)
    q, k, v, _, _ = _inputs(0, 1, 64, 2, 1, d, dtype)
    with pytest.raises(ValueError, match=message):
        swa_attention(q, k, v, window=8, forward="mosaic", interpret=True, **kwargs)
    with pytest.raises(ValueError, match="forward must be"):
        swa_attention(q, k, v, window=8, forward="cuda")
    with pytest.raises(ValueError, match="backward must be"):
        swa_attention(q, k, v, window=8, backward="cuda")


@pytest.mark.parametrize("block_kv,stages,extra", [(128, 2, {}), (64, 4, {}),
                                                   (128, 2, dict(persistent_ctas=132, q_buffers=2))])
def test_forward_lowers_to_mosaic_gpu_for_cuda(block_kv, stages, extra):
    """The wgmma form (transposed K view, preloaded accumulator, layouts) traces and lowers through Pallas's Mosaic
    GPU path on this CPU-only machine (shared memory within the H100's 227 KB: the lowering checks it); PTX
    compilation and speed need the GPU."""
    s = jax.ShapeDtypeStruct
    args = [s((1, 1024, 16, 128), jnp.bfloat16), s((1, 1024, 2, 128), jnp.bfloat16),
            s((1, 1024, 2, 128), jnp.bfloat16)]
    cfg = mgpu.MgpuConfig(window=300, sinks=128, scale=0.1, block_kv=block_kv, stages=stages, **extra)
    text = export.export(jax.jit(lambda q, k, v: mgpu.forward(q, k, v, cfg)), platforms=("cuda",))(*args).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("cfg", [dict(), dict(block_kv_dq=128, stages_dq=2, stages_dkv=2), dict(fused_dq=True),
                                 dict(dkv_split=3)])
def test_backward_lowers_to_mosaic_gpu_for_cuda(cfg):
    """Both backward kernels (or the dk/dv kernel alone, accumulating dq) lower for CUDA (layouts of the loaded
    lse/delta vectors, transposed views, TMA reduce-adds, shared memory within the H100's 227 KB: the lowering checks
    it)."""
    s = jax.ShapeDtypeStruct
    t, bf = 2048, jnp.bfloat16
    args = [s((1, t, 16, 128), bf), s((1, t, 2, 128), bf), s((1, t, 2, 128), bf), s((1, t, 16, 128), bf),
            s((1, 16, t), jnp.float32), s((1, t, 16, 128), bf), s((1, 16, t), jnp.float32)]
    bwd_cfg = mgpu.MgpuBwdConfig(window=300, sinks=128, scale=0.1, **cfg)
    text = export.export(jax.jit(lambda *a: mgpu.backward(*a, bwd_cfg)), platforms=("cuda",))(*args).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == (1 if bwd_cfg.fused_dq else 2)


def test_fused_dq_rule(monkeypatch):
    """Off by default (measured slower); BWD_FUSED_DQ="auto": dq accumulated by the dk/dv kernel where each
    warpgroup's half of D is whole 64-column tiles (D 128) with 64-row query tiles, or in the interpreter; a fused
    config it cannot run raises."""
    from pallas_kernels import swa_attention as tri

    def fused(*args):
        return dict(tri._mosaic_switches(*args, 4096))["fused_dq"]

    assert fused("mosaic", 128, 64, False) is False
    monkeypatch.setattr(mgpu, "BWD_FUSED_DQ", "auto")
    assert fused("mosaic", 128, 64, False) is True
    assert fused("mosaic", 64, 64, False) is False
    assert fused("mosaic", 128, 128, False) is False
    assert fused("mosaic", 64, 64, True) is True
    assert tri._mosaic_switches("triton", 128, 64, False, 4096) == ()  # the Mosaic backward's switches only
    q, k, v, _, _ = _inputs(0, 1, 128, 2, 1, 64, jnp.bfloat16)
    lse = jnp.zeros((1, 2, 128), jnp.float32)
    cfg = mgpu.MgpuBwdConfig(window=8, sinks=0, scale=0.125, fused_dq=True)
    with pytest.raises(ValueError, match="fused_dq"):
        mgpu.backward(q, k, v, q, lse, q, lse, cfg)


def test_dkv_split_rule(monkeypatch):
    """BWD_DKV_SPLIT="auto" (the default) picks the dk/dv shares measured best per window; an int overrides it."""
    from pallas_kernels import swa_attention as tri

    def split(window):
        return dict(tri._mosaic_switches("mosaic", 128, 64, False, window))["dkv_split"]

    assert [split(w) for w in (1, 1024, 2048, 4096, 6143, 6144, 8192, 32768)] == [2, 2, 2, 1, 1, 3, 3, 3]
    monkeypatch.setattr(mgpu, "BWD_DKV_SPLIT", 4)
    assert split(1024) == 4


def test_forward_q_buffers_rule(monkeypatch):
    """Two Q buffers (the next tile's Q prefetched) only on a persistent grid and only where shared memory holds
    them next to the K/V ring (128-key slots: 2 stages fit, 3 do not); FORWARD_Q_BUFFERS=1 turns them off."""
    assert mgpu.forward_q_buffers(132, 128, 2, 128) == 2
    assert mgpu.forward_q_buffers(132, 64, 4, 128) == 2
    assert mgpu.forward_q_buffers(132, 128, 3, 128) == 1  # 192 KB ring + 66 KB of Q/O: over 227 KB
    assert mgpu.forward_q_buffers(0, 128, 2, 128) == 1  # one tile per CTA: nothing to prefetch
    monkeypatch.setattr(mgpu, "FORWARD_Q_BUFFERS", 1)
    assert mgpu.forward_q_buffers(132, 128, 2, 128) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_ops_attention_pallas_picks_the_mosaic_kernels_on_hopper(d):
    """On a Hopper GPU, ahn_jax.ops.attention(impl="pallas") runs the Mosaic kernels (forward and backward, by
    swa_attention's "auto") and matches the XLA implementation, forward and gradients; T not a multiple of 128."""
    from pallas_kernels import swa_attention as tri

    from ahn_jax.ops.attention import attention

    if not mgpu.hopper_gpu():
        pytest.skip("needs a Hopper GPU (compute capability 9.x)")
    q, k, v, w_o, _ = _inputs(5, 2, 1000, 8, 2, d, jnp.bfloat16)
    assert tri._resolve_auto("auto", "auto", q, k, False, "kernel", False, None, None, None) == ("mosaic", "mosaic")
    # (Window 1 without sinks is left out: one visible key makes dq and dk exactly zero, so only noise is compared.)
    for window, sinks in ((2, 0), (100, 4), (300, 130), (2000, 0)):
        def loss(impl):
            def f(q, k, v):
                o = attention(q, k, v, window=window, sinks=sinks, impl=impl)
                return jnp.sum(o.astype(jnp.float32) * w_o), o
            return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

        (grads, o), (grads_x, o_x) = loss("pallas"), loss("xla")
        _assert_close(f"o W={window} S={sinks}", o, o_x, 2e-2)
        for name, g, g_x in zip(("dq", "dk", "dv"), grads, grads_x):
            _assert_close(f"{name} W={window} S={sinks}", g, g_x, 3e-2)
