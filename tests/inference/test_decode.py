"""prefill + decode with the fixed-size cache equal the parallel forward (AHN.md §5, §10.1 #1-2; ALLMEM.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ahn_jax.inference.cache import cache_nbytes
from ahn_jax.inference.decode import Decoder
from inference_helpers import MEMORIES, make, memory_effect, parallel_logits, random_ids

T = 14
TOL = 1e-4


def _check_prefill_then_decode(dec, ids, ref, split, chunk):
    """prefill(ids[:, :split]) then one-token decode of the rest: logits at every position == ref."""
    last, all_logits, cache = dec.prefill(ids[:, :split], chunk=chunk, return_all_logits=True)
    np.testing.assert_allclose(np.asarray(all_logits), np.asarray(ref[:, :split]), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref[:, split - 1]), atol=TOL, rtol=0)
    nbytes = cache_nbytes(cache)
    for t in range(split, ids.shape[1]):
        logits, cache = dec.decode(ids[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, t]), atol=TOL, rtol=0,
                                   err_msg=f"decode position {t} after a prefill of {split}")
        assert cache_nbytes(cache) == nbytes
    assert np.asarray(cache.lengths).tolist() == [ids.shape[1]] * ids.shape[0]


# Every memory with sinks 0 and > 0. Half of the matrix runs in the fast suite (each memory once, sinks alternating);
# the other half is marked slow (compiles dominate on 2 CPU cores).
FAST = [("gated_deltanet", 5, 3), ("deltanet", 6, 0), ("mamba2", 5, 3), ("ttt_mlp", 6, 0)]
SLOW = [("gated_deltanet", 6, 0), ("deltanet", 5, 3), ("mamba2", 6, 0), ("ttt_mlp", 5, 3)]
CASES = [pytest.param(*c, id="-".join(map(str, c))) for c in FAST] + \
    [pytest.param(*c, id="-".join(map(str, c)), marks=pytest.mark.slow) for c in SLOW]


@pytest.mark.parametrize("memory,window,sinks", CASES)
def test_prefill_plus_decode_equals_parallel_forward(memory, window, sinks):
    model = make(memory, window, sinks)
    ids = random_ids(2, T, seed=1)
    ref = parallel_logits(model, ids)
    dec = Decoder(model)
    # A prompt shorter than sinks + window (nothing evicted during prefill; decode then fills the window and starts
    # evicting: no token may be dropped), and a prompt longer than the window in chunks of 8 (> window): the memory
    # takes evicted tokens from the prompt chunk itself (window 6, sinks 0) and from the ring (second chunk).
    _check_prefill_then_decode(dec, ids, ref, split=4, chunk=4)
    _check_prefill_then_decode(dec, ids, ref, split=11, chunk=8)


def test_sink_writes_are_skipped_only_once_every_prompt_holds_its_sinks():
    """cache.sinks_full (decode compiled without sink writes and with in-bounds ring writes) is set by a prefill whose
    every prompt reaches the sinks; a shorter prompt keeps the sink writes, and decode still fills them correctly."""
    model = make("gated_deltanet", 5, 3)
    ids = random_ids(2, 10, seed=3)
    ref = parallel_logits(model, ids)
    dec = Decoder(model)
    assert dec.prefill(ids[:, :3])[1].sinks_full
    assert not dec.prefill(ids[:, :4], lengths=[4, 2])[1].sinks_full
    _, cache = dec.prefill(ids[:, :2])
    assert not cache.sinks_full
    for t in range(2, ids.shape[1]):  # positions 2 (the last sink) .. 9 (evicting into the memory)
        logits, cache = dec.decode(ids[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, t]), atol=TOL, rtol=0,
                                   err_msg=f"decode position {t} after a prefill of 2 (sinks 3)")


@pytest.mark.parametrize("memory", ["gated_deltanet", "ttt_mlp"])
def test_the_memory_contributes_so_the_tests_can_fail(memory):
    model = make(memory, 6, 0)
    assert memory_effect(model, random_ids(2, T, seed=1)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["gated_deltanet", "ttt_mlp"])
def test_chunked_prefill_equals_one_shot(memory):
    model = make(memory, 5, 3)
    ids = random_ids(2, 23, seed=2)
    dec = Decoder(model)
    last_1, all_1, cache_1 = dec.prefill(ids, chunk=None, return_all_logits=True)
    last_c, all_c, cache_c = dec.prefill(ids, chunk=4, return_all_logits=True)  # 4 < window: ring-sourced evictions
    np.testing.assert_allclose(np.asarray(all_c), np.asarray(all_1), atol=TOL, rtol=0)
    for a, b in zip(jax.tree.leaves(cache_c), jax.tree.leaves(cache_1)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(all_1), np.asarray(parallel_logits(model, ids)), atol=TOL, rtol=0)


def test_batch_with_different_lengths_equals_each_sequence_alone():
    model = make("gated_deltanet", 5, 3)
    lengths = np.asarray([6, 13])
    ids = random_ids(2, 13, seed=3)
    ids = ids.at[0, 6:].set(0)  # right padding
    dec = Decoder(model)
    last, all_logits, cache = dec.prefill(ids, lengths, chunk=4, return_all_logits=True)
    assert np.asarray(cache.lengths).tolist() == lengths.tolist()
    steps = random_ids(2, 4, seed=4)
    decoded = []
    for j in range(steps.shape[1]):
        logits, cache = dec.decode(steps[:, j], cache)
        decoded.append(logits)
    for b, n in enumerate(lengths):
        alone = jnp.concatenate([ids[b:b + 1, :n], steps[b:b + 1]], axis=1)
        ref = parallel_logits(model, alone)[0]
        np.testing.assert_allclose(np.asarray(all_logits[b, :n]), np.asarray(ref[:n]), atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(last[b]), np.asarray(ref[n - 1]), atol=TOL, rtol=0)
        for j, logits in enumerate(decoded):
            np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref[n + j]), atol=TOL, rtol=0)


def test_teacher_growing_cache_equals_full_attention():
    model = make("mamba2", 5, 3)
    ids = random_ids(2, 12, seed=5)
    ref = parallel_logits(model, ids, teacher=True)
    assert float(jnp.abs(ref - parallel_logits(model, ids)).max()) > 1e-3  # the student differs: not a no-op check
    dec = Decoder(model, teacher=True)
    last, cache = dec.prefill(ids[:, :7], chunk=4, max_length=12)
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref[:, 6]), atol=TOL, rtol=0)
    for t in range(7, 12):
        logits, cache = dec.decode(ids[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, t]), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="teacher cache is full"):
        dec.decode(ids[:, 0], cache)


def test_model_methods_and_bad_inputs():
    model = make("deltanet", 6, 0)  # shapes as in the main test: its compiles are reused
    ids = random_ids(2, T, seed=6)
    ref = parallel_logits(model, ids)
    last, cache = model.prefill(ids[:, :4], chunk=4)
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref[:, 3]), atol=TOL, rtol=0)
    logits, cache = model.decode(ids[:, 4:5], cache)  # [B, 1] accepted too (the evaluate CLI's form)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, 4]), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="input_ids"):
        model.prefill(ids[0])
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(ids, lengths=[3, 15])
    with pytest.raises(ValueError, match="token_ids"):
        model.decode(ids[:, :2], cache)
