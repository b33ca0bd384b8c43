"""The copy-free decode attention (block_attention over head-major sink and ring blocks) equals the old formulation
(concatenated token-major window + ops.attention.cached_attention) and a dense numpy reference with repeated KV heads;
and the compiled decode step updates every donated cache buffer in place (no copy of a ring)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ahn_jax.inference import decode as decode_module
from ahn_jax.inference.decode import Decoder, block_attention
from ahn_jax.ops.attention import cached_attention
from inference_helpers import make, random_ids

D = 8
HKV = 2


def _cache_state(rng, lengths, window, sinks, ring):
    """Slots of a cache after each sequence consumed `lengths[b]` tokens (the query is at position lengths[b] - 1, its
    own token already written). Every slot, empty ones included, holds random K/V so masking errors show.
    -> sink_k, sink_v [B, Hkv, S, D], ring_k, ring_v [B, Hkv, R, D], ring_pos [B, R] (-1 = empty)."""
    B = len(lengths)
    sink_k, sink_v = (rng.normal(size=(B, HKV, sinks, D)).astype(np.float32) for _ in range(2))
    ring_k, ring_v = (rng.normal(size=(B, HKV, ring, D)).astype(np.float32) for _ in range(2))
    ring_pos = np.full((B, ring), -1, np.int32)
    for b, n in enumerate(lengths):
        for p in range(sinks, n):  # the latest position written into each slot wins
            ring_pos[b, (p - sinks) % ring] = p
    return sink_k, sink_v, ring_k, ring_v, ring_pos


def _dense_reference(q, sink_k, sink_v, ring_k, ring_v, ring_pos, lengths, window, sinks):
    """Plain numpy: for each sequence, the visible keys by the definition (j < S or t - W < j <= t), KV heads repeated
    to the query heads, float64 softmax."""
    B, _, hq, _ = q.shape
    g = hq // HKV
    out = np.zeros(q.shape, np.float64)
    for b, n in enumerate(lengths):
        t = n - 1
        keys, vals = [], []
        for j in range(min(sinks, n)):
            keys.append(sink_k[b, :, j]), vals.append(sink_v[b, :, j])
        for slot, p in enumerate(ring_pos[b]):
            if p >= 0 and (window is None or t - window < p) and p <= t:
                keys.append(ring_k[b, :, slot]), vals.append(ring_v[b, :, slot])
        k = np.repeat(np.stack(keys, 1), g, axis=0)  # [Hq, N, D]
        v = np.repeat(np.stack(vals, 1), g, axis=0)
        s = np.einsum("hd,hnd->hn", q[b, 0].astype(np.float64), k) * D ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b, 0] = np.einsum("hn,hnd->hd", p / p.sum(-1, keepdims=True), v)
    return out


# (GQA group, window, sinks, ring, lengths): ragged batches where one sequence has a partly filled ring and another
# a wrapped one (several times); the teacher's growing cache (window None, no sinks, ring = max_length).
CASES = [
    (1, 6, 0, 7, [3, 20]),
    (2, 6, 3, 7, [2, 5, 31]),
    (8, 5, 4, 6, [4, 9, 12]),
    (2, 9, 2, 10, [1, 11, 12, 40]),
    (8, None, 0, 24, [1, 7, 24]),
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("group,window,sinks,ring,lengths", CASES)
def test_block_attention_equals_concatenated_and_dense_references(group, window, sinks, ring, lengths, split,
                                                                  monkeypatch):
    if split:  # decode's key splits (flash-decoding) on these small blocks: pieces of 4, 3 or 2 keys where they divide
        monkeypatch.setattr(decode_module, "KEY_SPLITS", (4, 3, 2))
        assert decode_module._key_split(ring, 1) < ring or ring == 7
    rng = np.random.default_rng(group * 100 + sinks * 10 + len(lengths))
    B, hq = len(lengths), HKV * group
    sink_k, sink_v, ring_k, ring_v, ring_pos = _cache_state(rng, lengths, window, sinks, ring)
    q = rng.normal(size=(B, 1, hq, D)).astype(np.float32)
    q_pos = np.asarray(lengths, np.int32)[:, None] - 1
    sink_pos = np.broadcast_to(np.arange(sinks, dtype=np.int32), (B, sinks))
    sink_valid = sink_pos < np.asarray(lengths)[:, None]
    blocks = [(sink_k, sink_v, sink_pos, sink_valid), (ring_k, ring_v, ring_pos, ring_pos >= 0)]
    got = jax.jit(lambda q, blocks, q_pos: block_attention(q, blocks, q_pos, window=window, sinks=sinks))(
        q, jax.tree.map(jnp.asarray, blocks), q_pos)

    # The old formulation: [sinks | ring] concatenated token-major, cached_attention's grouped dense softmax.
    tok = lambda a: np.swapaxes(a, 1, 2)  # noqa: E731
    old = cached_attention(q, np.concatenate([tok(sink_k), tok(ring_k)], 1), np.concatenate([tok(sink_v), tok(ring_v)], 1),
                           q_pos, np.concatenate([sink_pos, ring_pos], 1),
                           np.concatenate([sink_valid, ring_pos >= 0], 1), window=window, sinks=sinks)
    dense = _dense_reference(q, sink_k, sink_v, ring_k, ring_v, ring_pos, lengths, window, sinks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(old), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(got), dense, atol=2e-6, rtol=0)
    # The mask matters here: attending every valid slot (a window that hides nothing) gives another answer.
    if window is not None and max(lengths) > sinks + window:
        unmasked = block_attention(q, blocks, q_pos, window=10 ** 6, sinks=sinks)
        assert float(np.abs(np.asarray(unmasked) - dense).max()) > 1e-3


def test_block_attention_bad_shapes_name_the_tensors():
    q = jnp.zeros((1, 1, 4, D))
    k = jnp.ones((1, 3, 5, D))  # 3 KV heads do not divide 4 query heads
    with pytest.raises(ValueError, match="Hq % Hkv"):
        block_attention(q, [(k, k, jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5), bool))], jnp.zeros((1, 1)),
                        window=4, sinks=0)


def _big_copies(hlo_text, ring_dims):
    """Lines of optimised HLO that copy an array shaped like a cache ring (a copy of the window per step)."""
    shape = ",".join(map(str, ring_dims))
    return [line.strip()[:160] for line in hlo_text.splitlines()
            if ("copy(" in line or "copy-start(" in line) and f"[{shape}]" in line.split("=", 1)[-1][:60]]


@pytest.mark.parametrize("teacher", [False, True])
def test_decode_step_updates_the_donated_cache_in_place(teacher):
    """With the cache donated (as on GPU), the compiled decode step aliases every cache buffer to its output and
    copies no ring: the old concatenate formulation, or a read of a buffer before its in-place write, would."""
    model = make("gated_deltanet", 5, 3)
    dec = Decoder(model, teacher=teacher)
    cache = dec.init_cache(2, 13 if teacher else None)
    ids = random_ids(2, 1, seed=7)
    fn = jax.jit(decode_module._forward, static_argnums=(0,),
                 static_argnames=("decoding", "first_valid", "all_logits"), donate_argnums=(2,))
    for active in (None, jnp.asarray([True, False])):
        lowered = fn.lower(dec.graphdef, dec.state, cache, ids, active, decoding=True, first_valid=0,
                           all_logits=False)
        text = lowered.compile().as_text()
        ring = cache.layers[0].ring_k.shape
        assert _big_copies(text, ring) == []
        assert "input_output_alias" in text.split("\n", 1)[0]
    # The detector does find a copy when the step reads a buffer before writing it in place (on CPU: XLA's GPU
    # compiler reads the slice inside the in-place update's fusion and needs no copy, H100 2026-11-22).
    def read_then_write(buf, x):
        old = buf[:, :, 0]
        return buf.at[:, :, 1].set(x), old

    if jax.default_backend() == "cpu":
        buf = jnp.zeros(ring)
        text = jax.jit(read_then_write, donate_argnums=(0,)).lower(buf, buf[:, :, 0]).compile().as_text()
        assert _big_copies(text, ring)


def test_query_tiled_attention_equals_one_block(monkeypatch):
    """Prefill's query tiling (tiled_block_attention, lax.map over tiles) gives block_attention's result for a chunk
    whose length is not a multiple of the tile, with a partly filled ring and a chunk block; and a whole prefill with a
    3-query tile reproduces the parallel forward."""
    rng = np.random.default_rng(7)
    B, tq, hq, window, sinks, ring = 2, 11, 4, 6, 2, 7
    lengths = [9, 15]  # tokens already in the cache before the chunk
    sink_k, sink_v, ring_k, ring_v, ring_pos = _cache_state(rng, lengths, window, sinks, ring)
    q = jnp.asarray(rng.normal(size=(B, tq, hq, D)), jnp.float32)
    q_pos = jnp.asarray(lengths)[:, None] + jnp.arange(tq)[None]
    chunk_k, chunk_v = (jnp.asarray(rng.normal(size=(B, HKV, tq, D)), jnp.float32) for _ in range(2))
    sink_pos = jnp.broadcast_to(jnp.arange(sinks), (B, sinks))
    blocks = [(sink_k, sink_v, sink_pos, jnp.ones((B, sinks), bool)),
              (ring_k, ring_v, ring_pos, jnp.asarray(ring_pos >= 0)),
              (chunk_k, chunk_v, q_pos, jnp.ones((B, tq), bool))]
    blocks = jax.tree.map(jnp.asarray, blocks)
    # Jitted: op by op the two took ~4 s, compiled ~1.3 s.
    whole = jax.jit(lambda q, blocks, q_pos: block_attention(q, blocks, q_pos, window=window, sinks=sinks))(
        q, blocks, q_pos)
    tiled = jax.jit(lambda q, blocks, q_pos: decode_module.tiled_block_attention(
        q, blocks, q_pos, window=window, sinks=sinks, tile=4))(q, blocks, q_pos)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(whole), atol=1e-6, rtol=0)

    monkeypatch.setattr(decode_module, "PREFILL_QUERY_TILE", 3)
    model = make("gated_deltanet", 5, 3)
    ids = random_ids(2, 13, seed=8)
    _, all_logits, _ = Decoder(model).prefill(ids, chunk=8, return_all_logits=True)
    from inference_helpers import parallel_logits
    np.testing.assert_allclose(np.asarray(all_logits), np.asarray(parallel_logits(model, ids)), atol=1e-4, rtol=0)


def test_aligned_ring_with_key_splits_equals_parallel_forward(monkeypatch):
    """Large rings are rounded up (cache.ring_slots) and decode splits their keys: forced here on a tiny model (ring of
    window + 1 = 6 slots rounded to 8, splits of 4 keys) so a prompt wraps the ring several times; prefill + one-token
    decode must still give the parallel forward's logits."""
    from ahn_jax.inference import cache as cache_module
    from inference_helpers import parallel_logits

    monkeypatch.setattr(cache_module, "RING_ALIGN", 8)
    monkeypatch.setattr(cache_module, "RING_ALIGN_FROM", 0)
    monkeypatch.setattr(decode_module, "KEY_SPLITS", (4,))
    model = make("gated_deltanet", 5, 3)
    ids = random_ids(2, 30, seed=9)
    dec = Decoder(model)
    assert dec.init_cache(2).ring_size == 8
    _, all_logits, cache = dec.prefill(ids[:, :9], chunk=4, return_all_logits=True)
    got = [all_logits]
    for t in range(9, ids.shape[1]):
        logits, cache = dec.decode(ids[:, t], cache)
        got.append(logits[:, None])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, 1)), np.asarray(parallel_logits(model, ids)),
                               atol=1e-4, rtol=0)


def test_greedy_device_loop_equals_stepwise_argmax():
    """Decoder.greedy (n steps in one compiled fori_loop) generates what n separate steps with argmax generate, and
    leaves the same cache."""
    model = make("gated_deltanet", 5, 3)
    dec = Decoder(model)
    ids = random_ids(2, 9, seed=10)
    _, cache = dec.prefill(ids)
    token = ids[:, -1:]  # any token: the loop starts by feeding it
    # greedy donates its cache (on a GPU the buffers are then gone): hand it a copy, keep `cache` for the steps.
    got, cache_loop = dec.greedy(token, jax.tree.map(jnp.copy, cache), 6)
    want = []
    for _ in range(6):
        logits, cache = dec.step(token, cache)
        token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
        want.append(token)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.concatenate(want, 1)))
    assert len(set(np.asarray(got).ravel().tolist())) > 1  # not one repeated token: the loop feeds back
    for a, b in zip(jax.tree.leaves(cache_loop), jax.tree.leaves(cache)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-5, rtol=0)
