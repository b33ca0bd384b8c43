"""The Pallas decode-attention kernel (pallas_kernels/decode_attention.py, interpret mode on CPU) against the XLA
block attention it replaces (decode.block_attention), and prefill + decode with decode.DECODE_ATTENTION_KERNEL on
against the parallel forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.decode_attention as decode_attention
from ahn_jax.inference import decode
from ahn_jax.inference.decode import Decoder, block_attention
from inference_helpers import greedy_with_switch_off_and_on, make, parallel_logits, random_ids

B, HQ, D = 3, 8, 16


def _blocks(hkv, dtype, seed, sizes=(16, 48, 12)):
    """Key blocks as the cache holds them: head-major k, v; positions with empty slots (-1, invalid) and slots of
    tokens the window no longer shows. The 12-key block has no power-of-two split: it stays on the XLA path."""
    ks = jax.random.split(jax.random.key(seed), 3 * len(sizes))
    rng = np.random.default_rng(seed)
    blocks, start = [], 0
    for i, n in enumerate(sizes):
        k = jax.random.normal(ks[3 * i], (B, hkv, n, D), jnp.float32).astype(dtype)
        v = jax.random.normal(ks[3 * i + 1], (B, hkv, n, D), jnp.float32).astype(dtype)
        pos = start + np.stack([rng.permutation(n) for _ in range(B)])
        pos[:, rng.integers(0, n, size=3)] = -1  # empty slots
        pos = jnp.asarray(pos, jnp.int32)
        blocks.append((k, v, pos, pos >= 0))
        start += n
    return blocks


# GQA groups 4 (padded to 16 rows), 1 (full causal, no sinks) and 8 (bf16).
@pytest.mark.parametrize("dtype,hkv,window,sinks", [(jnp.float32, 2, 20, 16), (jnp.float32, 8, None, 0),
                                                    (jnp.bfloat16, 1, 5, 3)])
def test_kernel_partials_merge_to_block_attention(dtype, hkv, window, sinks, monkeypatch):
    calls = []
    kernel = decode_attention.decode_attention_partials_blocks
    monkeypatch.setattr(decode_attention, "decode_attention_partials_blocks",
                        lambda *a, **k: calls.append(sorted(b[0].shape[2] for b in a[1])) or kernel(*a, **k))
    blocks = _blocks(hkv, dtype, seed=hkv)
    q = jax.random.normal(jax.random.key(7), (B, 1, HQ, D), jnp.float32).astype(dtype)
    q_pos = jnp.asarray([[3], [40], [75]], jnp.int32)  # sees few keys / the middle / everything (76 keys)
    # Jitted: op by op the XLA form and the interpreted kernel took ~5 s per case, compiled ~1.4 s.
    attend = jax.jit(lambda q, blocks, q_pos, kernel: block_attention(q, blocks, q_pos, window=window, sinks=sinks,
                                                                      kernel=kernel), static_argnums=3)
    want = attend(q, blocks, q_pos, False)
    got = attend(q, blocks, q_pos, True)
    assert calls == [[16, 48]], calls  # one launch for both; the 12-key block kept the XLA form
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_a_query_that_sees_no_key_gets_zeros():
    blocks = [(k, v, pos, jnp.zeros_like(valid)) for k, v, pos, valid in _blocks(2, jnp.float32, seed=3, sizes=(32,))]
    q = jax.random.normal(jax.random.key(1), (B, 1, HQ, D), jnp.float32)
    out = block_attention(q, blocks, jnp.full((B, 1), 50, jnp.int32), window=8, sinks=0, kernel=True)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_partials_reject_a_block_no_split_divides():
    k = jnp.zeros((1, 1, 12, D))
    with pytest.raises(ValueError, match="no key split"):
        decode_attention.decode_attention_partials(jnp.zeros((1, 1, 2, D)), k, k, jnp.zeros((1, 12), jnp.int32),
                                                   jnp.ones((1, 12), bool), jnp.zeros((1,), jnp.int32), window=4,
                                                   sinks=0, scale=0.25)


def test_prefill_then_kernel_decode_equals_parallel_forward(monkeypatch):
    """Window 15 + 16 sinks: the ring (16 slots) and the sink block both go through the kernel."""
    calls = []
    kernel = decode_attention.decode_attention_partials_blocks
    monkeypatch.setattr(decode_attention, "decode_attention_partials_blocks",
                        lambda *a, **k: calls.append(tuple(b[0].shape[2] for b in a[1])) or kernel(*a, **k))
    monkeypatch.setattr(decode, "DECODE_ATTENTION_KERNEL", True)
    model = make("gated_deltanet", 15, 16)
    ids = random_ids(2, 38, seed=4)  # positions 31.. evict into the memory
    ref = parallel_logits(model, ids)
    dec = Decoder(model)
    _, cache = dec.prefill(ids[:, :28], chunk=8)
    for t in range(28, ids.shape[1]):
        logits, cache = dec.decode(ids[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, t]), atol=1e-4, rtol=0,
                                   err_msg=f"kernel decode at position {t}")
    assert set(calls) == {(16, 16)}, calls  # sinks and ring in one launch


def test_greedy_loop_gets_the_switch_and_the_same_tokens(monkeypatch):
    model = make("gated_deltanet", 15, 16)
    ids = random_ids(2, 24, seed=5)
    out, traced = greedy_with_switch_off_and_on(monkeypatch, Decoder(model), ids, 8, "DECODE_ATTENTION_KERNEL",
                                                decode_attention, "decode_attention_partials_blocks")
    assert traced, "the greedy loop never traced the kernel"
    np.testing.assert_array_equal(np.asarray(out[True]), np.asarray(out[False]))


def test_auto_switch_uses_the_kernel_on_gpus_only(monkeypatch):
    for value, want in (("auto", jax.default_backend() == "gpu"), (True, True), (False, False)):
        monkeypatch.setattr(decode, "DECODE_ATTENTION_KERNEL", value)
        assert decode.decode_attention_kernel_enabled() is want
