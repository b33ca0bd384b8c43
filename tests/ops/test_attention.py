"""ops.attention against a dense float32 reference whose mask is built here by plain loops (not by ops/window.py)."""

import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ahn_jax.ops import attention, cached_attention
from ahn_jax.ops.attention import _cudnn_unsupported, _splash_impl, attention_xla

T = 37        # not a multiple of the block below
BLOCK = 16    # several query blocks, so the window and sink slabs are really cut out
D = 8


def loop_mask(q_pos, k_pos, window, sinks):
    """mask[i, j]: query at absolute position q_pos[i] sees key at k_pos[j] (spec/AHN.md §1.3)."""
    m = np.zeros((len(q_pos), len(k_pos)), dtype=bool)
    for i, t in enumerate(q_pos):
        for j, s in enumerate(k_pos):
            m[i, j] = s <= t and (t - s < window or s < sinks)
    return m


def dense_reference(q, k, v, mask, scale):
    """Plain softmax attention with K/V repeated per group. mask [B or 1, Tq, Tk]. Differentiable (jnp)."""
    G = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, G, axis=2)
    v = jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = jnp.where(mask[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def random_qkv(seed, groups, hkv=2, t=T, dtype=jnp.float32, d=D):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(2, t, hkv * groups, d)), dtype)
    k = jnp.asarray(r.normal(size=(2, t, hkv, d)), dtype)
    v = jnp.asarray(r.normal(size=(2, t, hkv, d)), dtype)
    return q, k, v


def reference_for(q, k, v, window, sinks):
    pos = np.arange(q.shape[1])
    return dense_reference(q, k, v, jnp.asarray(loop_mask(pos, pos, window, sinks))[None], D ** -0.5)


WINDOWS = [1, 7, 64, None]  # 64 > T and None both mean full causal
SINKS = [0, 1, 4]
GROUPS = [1, 2, 8]
# every (window, sinks) pair once; the groups cycle so that each group meets every window
CASES = [(w, s, GROUPS[i % 3]) for i, (w, s) in enumerate(itertools.product(WINDOWS, SINKS))]


@pytest.mark.parametrize("window,sinks,groups", CASES)
def test_forward_matches_dense_reference(window, sinks, groups):
    q, k, v = random_qkv(hash((window, sinks, groups)) % 1000, groups)
    ref = reference_for(q, k, v, window or T, sinks)
    blockwise = attention_xla(q, k, v, window=window or T, sinks=sinks, scale=D ** -0.5, block_q=BLOCK)
    public = attention(q, k, v, window=window, sinks=sinks, impl="auto")
    np.testing.assert_allclose(blockwise, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(public, ref, atol=2e-5, rtol=2e-5)


def test_lse_matches_reference():
    q, k, v = random_qkv(3, 2)
    out, lse = attention_xla(q, k, v, window=7, sinks=4, scale=0.3, return_lse=True, block_q=BLOCK)
    pos = np.arange(T)
    mask = loop_mask(pos, pos, 7, 4)
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2)) * 0.3
    ref = np.log(np.where(mask, np.exp(s), 0.0).sum(-1)).transpose(0, 2, 1)
    np.testing.assert_allclose(lse, ref, atol=1e-5, rtol=1e-5)
    assert lse.dtype == jnp.float32 and out.shape == q.shape


GRAD_CASES = [(1, 0, 1), (7, 4, 2), (7, 1, 8), (None, 4, 2), (3, 4, 1)]  # (3, 4): sinks overlap the window slab


@pytest.mark.parametrize("window,sinks,groups", GRAD_CASES)
def test_gradients_match_dense_reference(window, sinks, groups):
    q, k, v = random_qkv(11 + groups, groups)
    w = np.asarray(np.random.default_rng(5).normal(size=q.shape), np.float32)  # random cotangent

    def loss_fast(q, k, v):
        return jnp.sum(attention_xla(q, k, v, window=window or T, sinks=sinks, scale=D ** -0.5,
                                     block_q=BLOCK) * w)

    def loss_ref(q, k, v):
        return jnp.sum(reference_for(q, k, v, window or T, sinks) * w)

    got = jax.jit(jax.grad(loss_fast, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_lse_gradient_matches_reference():
    q, k, v = random_qkv(21, 2)
    pos = np.arange(T)
    mask = jnp.asarray(loop_mask(pos, pos, 7, 4))

    def fast(q, k):
        return jnp.sum(jnp.sin(attention_xla(q, k, v, window=7, sinks=4, scale=0.5, return_lse=True,
                                             block_q=BLOCK)[1]))

    def ref(q, k):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, 2)) * 0.5
        return jnp.sum(jnp.sin(jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)))

    for g, r in zip(jax.jit(jax.grad(fast, (0, 1)))(q, k), jax.jit(jax.grad(ref, (0, 1)))(q, k)):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


def test_bf16_output_dtype_and_accuracy():
    q, k, v = random_qkv(4, 2, dtype=jnp.bfloat16)
    out = attention(q, k, v, window=7, sinks=4)
    assert out.dtype == jnp.bfloat16
    ref = reference_for(*(x.astype(jnp.float32) for x in (q, k, v)), 7, 4)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


def test_traced_window_and_sinks_do_not_recompile():
    q, k, v = random_qkv(7, 2)
    traces = []

    @jax.jit
    def blockwise(q, k, v, window, sinks):
        traces.append(1)
        return attention_xla(q, k, v, window=window, sinks=sinks, scale=D ** -0.5, block_q=8,
                             max_window=9, max_sinks=4)

    @jax.jit
    def public(q, k, v, window, sinks):
        traces.append(2)
        return attention(q, k, v, window=window, sinks=sinks, max_window=9, max_sinks=4)

    for window, sinks in [(7, 4), (1, 0), (9, 1), (3, 3)]:
        w, s = jnp.int32(window), jnp.int32(sinks)
        ref = reference_for(q, k, v, window, sinks)
        np.testing.assert_allclose(blockwise(q, k, v, w, s), ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(public(q, k, v, w, s), ref, atol=2e-5, rtol=2e-5)
    assert traces.count(1) == 1 and traces.count(2) == 1, traces

    g = jax.jit(jax.grad(lambda q, w: jnp.sum(attention_xla(q, k, v, window=w, sinks=jnp.int32(2), scale=0.3,
                                                            block_q=8, max_window=9, max_sinks=4) ** 2)))
    r = jax.grad(lambda q: jnp.sum(dense_reference(q, k, v, jnp.asarray(loop_mask(np.arange(T), np.arange(T), 5, 2))
                                                   [None], 0.3) ** 2))(q)
    np.testing.assert_allclose(g(q, jnp.int32(5)), r, atol=5e-5, rtol=5e-5)


def test_traced_sinks_with_finite_window_need_a_bound():
    q, k, v = random_qkv(8, 1)
    with pytest.raises(ValueError, match="max_sinks"):
        jax.jit(lambda s: attention_xla(q, k, v, window=4, sinks=s, scale=1.0, block_q=8))(jnp.int32(1))
    # when the window slab already spans the whole prefix, no sink slab (and no bound) is needed
    out = jax.jit(lambda s: attention(q, k, v, window=4, sinks=s))(jnp.int32(2))
    np.testing.assert_allclose(out, reference_for(q, k, v, 4, 2), atol=2e-5, rtol=2e-5)


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(9, 2)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q[:, :, :3], k, v, window=4)
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k, v[:, :-1], window=4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        attention(q, k, v, window=3, sinks=-1)
    with pytest.raises(ValueError, match="unknown impl"):
        attention(q, k, v, window=3, impl="nope")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks that cudnn refuses to run off-GPU")
def test_explicit_gpu_impl_off_gpu_raises():
    q, k, v = random_qkv(9, 2)
    with pytest.raises(RuntimeError, match="cannot run on backend"):
        attention(q, k, v, window=3, impl="cudnn")


def test_cudnn_refuses_what_it_cannot_compute_exactly():
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert _cudnn_unsupported(q, 4, 0, False) is None
    assert "sinks" in _cudnn_unsupported(q, 4, 2, False)
    assert "static" in _cudnn_unsupported(q, jnp.int32(4), 0, False)
    assert "log-sum-exp" in _cudnn_unsupported(q, 4, 0, True)
    assert "bf16" in _cudnn_unsupported(q.astype(jnp.float32), 4, 0, False)


def test_long_sequence_memory_stays_far_below_a_square_matrix():
    """Compile-only at T=16384: forward and backward temp memory must be tiny next to one [T, T] f32 matrix."""
    t = 16384
    q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)

    def fwd(q, k, v):
        return attention(q, k, v, window=64, sinks=4, impl="xla")

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v) ** 2)

    square = t * t * 4
    for fn in (fwd, jax.grad(loss, argnums=(0, 1, 2))):
        mem = jax.jit(fn).lower(q, kv, kv).compile().memory_analysis()
        if mem is None:
            pytest.fail("memory_analysis() is unavailable on this backend; the check cannot run")
        assert mem.temp_size_in_bytes < square / 50, (fn, mem.temp_size_in_bytes, square)


def test_cached_attention_matches_reference():
    r = np.random.default_rng(12)
    B, Tq, Tk, Hkv, G = 2, 3, 20, 2, 4
    q = jnp.asarray(r.normal(size=(B, Tq, Hkv * G, D)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, Tk, Hkv, D)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, Tk, Hkv, D)), jnp.float32)
    # A ring-buffer-like cache: positions out of order, some slots empty, a different context length per row.
    q_pos = np.stack([np.arange(30, 30 + Tq), np.arange(35, 35 + Tq)]).astype(np.int32)
    k_pos, k_valid = [], []
    for b in range(B):  # the new tokens plus a random older subset, shuffled; some older slots empty
        pos = np.concatenate([q_pos[b], r.permutation(q_pos[b, 0])[:Tk - Tq]])
        valid = np.concatenate([np.ones(Tq, bool), r.random(Tk - Tq) > 0.2])
        order = r.permutation(Tk)
        k_pos.append(pos[order])
        k_valid.append(valid[order])
    k_pos, k_valid = np.stack(k_pos).astype(np.int32), np.stack(k_valid)
    for window, sinks in [(7, 4), (1, 0), (None, 0), (12, 1)]:
        mask = np.stack([loop_mask(q_pos[b], k_pos[b], window or 10 ** 9, sinks) & k_valid[b][None]
                         for b in range(B)])
        got = cached_attention(q, k, v, q_pos, k_pos, k_valid, window=window, sinks=sinks)
        np.testing.assert_allclose(got, dense_reference(q, k, v, jnp.asarray(mask), D ** -0.5), atol=2e-5, rtol=2e-5)


def test_cached_attention_equals_attention_on_an_in_order_cache_and_zeros_empty_rows():
    q, k, v = random_qkv(13, 2)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    valid = np.ones((2, T), bool)
    np.testing.assert_allclose(cached_attention(q, k, v, pos, pos, valid, window=5, sinks=2),
                               attention(q, k, v, window=5, sinks=2), atol=2e-5, rtol=2e-5)
    none_valid = cached_attention(q, k, v, pos, pos, np.zeros((2, T), bool), window=5, sinks=2)
    assert np.all(np.asarray(none_valid) == 0)
    with pytest.raises(ValueError, match="k_valid"):
        cached_attention(q, k, v, pos, pos, valid[:, :-1], window=5)


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():  # untested here: needs a GPU
    q, k, v = random_qkv(14, 2, t=256, dtype=jnp.bfloat16, d=64)
    for window in (1, 7, 64, 256):
        got = attention(q, k, v, window=window, impl="cudnn")
        want = attention(q, k, v, window=window, impl="xla")
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2, rtol=2e-2)
        gf = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, window=window, impl="cudnn")
                                              .astype(jnp.float32) ** 2), (0, 1, 2))(q, k, v)
        gx = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, window=window, impl="xla")
                                              .astype(jnp.float32) ** 2), (0, 1, 2))(q, k, v)
        for a, b in zip(gf, gx):
            np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="sinks"):
        attention(q, k, v, window=7, sinks=4, impl="cudnn")
    ref = attention(q, k, v, window=7, sinks=4, impl="xla")  # auto must skip cudnn for sinks
    np.testing.assert_allclose(attention(q, k, v, window=7, sinks=4).astype(jnp.float32),
                               ref.astype(jnp.float32), atol=2e-2, rtol=2e-2)


def test_splash_kernel_in_interpret_mode_matches_reference():
    """The TPU splash wrapper (mask, GQA grouping, padding, scale) run by Pallas' interpreter on CPU."""
    q, k, v = random_qkv(16, 2, d=128)
    r = np.random.default_rng(17)
    pos = np.arange(T)

    def splash(q, k, v, window, sinks):
        return _splash_impl(q, k, v, window=window, sinks=sinks, scale=0.1, return_lse=False, max_window=None,
                            max_sinks=None, interpret=True)

    def ref(q, k, v, window, sinks):
        return dense_reference(q, k, v, jnp.asarray(loop_mask(pos, pos, window, sinks))[None], 0.1)

    np.testing.assert_allclose(splash(q, k, v, 1, 0), ref(q, k, v, 1, 0), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(splash(q, k, v, 64, 1), ref(q, k, v, 64, 1), atol=2e-5, rtol=2e-5)
    w = jnp.asarray(r.normal(size=q.shape), jnp.float32)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(splash(*a, 7, 4) * w), (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a, 7, 4) * w), (0, 1, 2)))(q, k, v)
    for name, g, rr in zip("qkv", got, want):
        np.testing.assert_allclose(g, rr, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.tpu
def test_splash_matches_xla_on_tpu():  # untested here: needs a TPU
    q, k, v = random_qkv(15, 2, t=600, dtype=jnp.bfloat16, d=128)
    for window, sinks in [(1, 0), (7, 4), (64, 1), (600, 0)]:
        got = attention(q, k, v, window=window, sinks=sinks, impl="splash")
        want = attention(q, k, v, window=window, sinks=sinks, impl="xla")
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2, rtol=2e-2)
