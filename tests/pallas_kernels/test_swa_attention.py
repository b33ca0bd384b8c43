"""pallas_kernels.swa_attention against a dense float32 reference, forward and gradients, in interpret mode on CPU.

The reference builds its sink+window mask with numpy from the definition (query t sees key j iff j <= t and
(t - j < window or j < sinks)), independently of both the kernel and ahn_jax.ops.window. Cases cover window 1..T and
beyond, sinks 0/1/small/block-crossing/256, GQA groups 1/2/8, T not a multiple of the block, distinct forward and
backward tiles (so the dk/dv sink-tail programs run), the lse output and its gradient, and bf16 inputs; the faster
variants (dq_mode="atomic", lazy_rescale, separate dq tiles) are checked the same way.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.swa_attention import swa_attention

# Interpret-mode kernels are big while-loops; XLA's CPU optimisation passes triple their compile time for no gain here.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _numpy_mask(seq_len, window, sinks):
    mask = np.zeros((seq_len, seq_len), dtype=bool)
    for t in range(seq_len):
        for j in range(t + 1):
            mask[t, j] = (t - j < window) or (j < sinks)
    return mask


def _dense_reference(q, k, v, window, sinks, scale=None):
    """o [B,T,Hq,D] and lse [B,T,Hq], all in float32, with K/V repeated to the query heads."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    t, hq, d = q.shape[1], q.shape[2], q.shape[3]
    group = hq // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scale = d ** -0.5 if scale is None else scale
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    scores = jnp.where(_numpy_mask(t, window, sinks), scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", jnp.exp(scores - lse[..., None]), v)
    return o, jnp.swapaxes(lse, 1, 2)


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    w_o = jax.random.normal(keys[3], (b, t, hq, d), jnp.float32)
    w_lse = jax.random.normal(keys[4], (b, t, hq), jnp.float32)
    return q, k, v, w_o, w_lse


def _assert_close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
    assert err < tol, f"{name}: relative max error {err:.2e} >= {tol:.0e}"


def _check(seed, *, b=1, t, hq, hkv, d=16, window, sinks, blocks=(16, 16, 16, 16), dtype=jnp.float32, tol=2e-5,
           with_lse=True, q_gain=1.0, variant=None):
    q, k, v, w_o, w_lse = _inputs(seed, b, t, hq, hkv, d, dtype)
    q = (q * q_gain).astype(dtype)  # q_gain > 1 spreads the scores so running row maxes keep growing
    bq, bk, bqb, bkb = blocks

    def ours(q, k, v):
        out = swa_attention(q, k, v, window=window, sinks=sinks, return_lse=with_lse, block_q=bq, block_k=bk,
                            block_q_bwd=bqb, block_k_bwd=bkb, interpret=True, **(variant or {}))
        return out if with_lse else (out, None)

    def ref(q, k, v):
        return _dense_reference(q, k, v, window, sinks)

    def loss(attn):
        def f(q, k, v):
            o, lse = attn(q, k, v)
            total = jnp.sum(o.astype(jnp.float32) * w_o)
            return total + jnp.sum(lse * w_lse) if with_lse else total
        return f

    def outputs_and_grads(attn):
        return attn(q, k, v), jax.grad(loss(attn), argnums=(0, 1, 2))(q, k, v)

    (o, lse), grads = _compiled(lambda q, k, v: outputs_and_grads(ours), q, k, v)
    (o_ref, lse_ref), grads_ref = jax.jit(lambda q, k, v: outputs_and_grads(ref))(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype
    _assert_close("o", o, o_ref, tol)
    if with_lse:
        assert lse.shape == (b, t, hq) and lse.dtype == jnp.float32
        _assert_close("lse", lse, lse_ref, tol)
    for name, g, g_ref, x in zip(("dq", "dk", "dv"), grads, grads_ref, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        _assert_close(name, g, g_ref, tol)


@pytest.mark.parametrize(
    "t, hq, hkv, window, sinks, blocks",
    [
        (50, 4, 2, 1, 0, (16, 16, 16, 16)),  # window 1: each query sees only itself
        (50, 4, 2, 5, 3, (16, 16, 16, 16)),  # sinks inside the first block, T % 16 != 0
        (67, 2, 2, 20, 17, (16, 32, 32, 16)),  # sinks crossing a block edge, mixed tiles, group 1
        (40, 8, 1, 40, 4, (16, 16, 16, 16)),  # window == T (plain causal), group 8
        (100, 4, 2, 7, 40, (16, 16, 32, 16)),  # several sink blocks, dk/dv sink tail split over programs
        (300, 2, 1, 33, 256, (32, 32, 32, 32)),  # 256 sinks, long tail, group 2
        (45, 2, 2, 1000, 1, (16, 16, 16, 16)),  # window beyond T, one sink
    ],
)
def test_matches_dense_reference_forward_and_gradients(t, hq, hkv, window, sinks, blocks):
    _check(t + window + sinks, t=t, hq=hq, hkv=hkv, window=window, sinks=sinks, blocks=blocks)


# The faster variants (dq accumulated by atomic adds inside the dk/dv kernel; lazily rescaled forward) on the same
# cases as the default path: windows 1..beyond T, sinks 0..256, GQA groups 1/2/8, T not a multiple of the block.
_FAST = dict(dq_mode="atomic", lazy_rescale=True)


@pytest.mark.parametrize(
    "t, hq, hkv, window, sinks, blocks",
    [
        (50, 4, 2, 1, 0, (16, 16, 16, 16)),
        (67, 2, 2, 20, 17, (16, 32, 32, 16)),
        (40, 8, 1, 40, 4, (16, 16, 16, 16)),
        (100, 4, 2, 7, 40, (16, 16, 32, 16)),  # sink tail split over extra programs, which add into dq too
        (300, 2, 1, 33, 256, (32, 32, 32, 32)),
        (45, 2, 2, 1000, 1, (16, 16, 16, 16)),
    ],
)
def test_atomic_dq_and_lazy_rescale_match_dense_reference(t, hq, hkv, window, sinks, blocks):
    _check(t + window + sinks, t=t, hq=hq, hkv=hkv, window=window, sinks=sinks, blocks=blocks, variant=_FAST)


@pytest.mark.parametrize("window, sinks", [(24, 0), (90, 5)])
def test_lazy_rescale_with_widely_spread_scores(window, sinks):
    # Scores spanning tens of log2 units: row maxes grow by more than the 2**8 slack between blocks, so both the
    # rescaling branch and the skipping branch run; p must stay finite and the result exact.
    _check(11 + window, t=100, hq=2, hkv=1, window=window, sinks=sinks, q_gain=6.0, tol=1e-4,
           variant=dict(lazy_rescale=True))


def test_separate_dq_kernel_tiles():
    # dq kernel with tiles unlike the dk/dv kernel's (and an 8-group GQA), T % 32 != 0.
    _check(5, t=90, hq=8, hkv=1, window=21, sinks=19, blocks=(16, 16, 16, 32),
           variant=dict(block_q_dq=32, block_k_dq=16))


def test_atomic_dq_bfloat16():
    _check(8, t=80, hq=4, hkv=2, d=32, window=50, sinks=4, dtype=jnp.bfloat16, tol=3e-2, with_lse=False,
           variant=_FAST)


def test_bfloat16_inputs_and_no_lse():
    # bf16 operands: the kernel rounds p and ds to bf16 before its matmuls, so the tolerance is bf16's.
    _check(7, b=2, t=80, hq=4, hkv=2, d=32, window=50, sinks=4, dtype=jnp.bfloat16, tol=3e-2, with_lse=False)


def test_default_tiles_and_scale():
    q, k, v, _, _ = _inputs(3, 1, 70, 2, 1, 64)
    o = _compiled(lambda q, k, v: swa_attention(q, k, v, window=9, sinks=2, scale=0.3, interpret=True), q, k, v)
    o_ref, _ = _dense_reference(q, k, v, 9, 2, scale=0.3)
    _assert_close("o", o, o_ref, 2e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "window"),
        (dict(window=4, sinks=-1), "sinks"),
        (dict(window=4, block_q=24), "block_q"),
        (dict(window=4, block_k_dq=48), "block_k_dq"),
        (dict(window=4, dq_mode="fused"), "dq_mode"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    q, k, v, _, _ = _inputs(0, 1, 32, 4, 2, 16)
    with pytest.raises(ValueError, match=message):
        swa_attention(q, k, v, interpret=True, **kwargs)


def test_bad_shapes_raise():
    q, k, v, _, _ = _inputs(0, 1, 32, 3, 2, 16)
    with pytest.raises(ValueError, match="kv heads"):
        swa_attention(q, k, v, window=4, interpret=True)
    with pytest.raises(ValueError, match="k "):
        swa_attention(q[:, :, :2], k[:, :16], v, window=4, interpret=True)
