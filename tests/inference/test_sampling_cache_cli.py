"""Sampling masks, the cache's constant byte size, generate() and the `python -m ahn_jax.generate` CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ahn_jax.inference.cache import cache_nbytes, init_cache
from ahn_jax.inference.decode import Decoder
from ahn_jax.inference.sampling import sample, top_k_mask, top_p_mask
from inference_helpers import make, parallel_logits


def _logits(seed=0, B=3, V=50):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, V)) * 2, jnp.float32)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_mask_keeps_the_k_largest(k):
    logits = _logits()
    mask = np.asarray(top_k_mask(logits, k))
    for row, m in zip(np.asarray(logits), mask):
        assert set(np.flatnonzero(m)) == set(np.argsort(-row)[:k])
    assert np.asarray(top_k_mask(logits, 0)).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_mask_is_the_smallest_nucleus(p):
    logits = _logits(1)
    mask = np.asarray(top_p_mask(logits, p))
    for row, m in zip(np.asarray(logits, np.float64), mask):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # first prefix whose mass reaches p
        assert set(np.flatnonzero(m)) == set(order[:n])
    assert np.asarray(top_p_mask(logits, 1.0)).all()


def test_sample_greedy_and_masked_draws():
    logits = _logits(2)
    greedy = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(0), temperature=0.0)), greedy)
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(0), temperature=1.0, top_k=1)), greedy)
    allowed = np.asarray(top_k_mask(logits, 4) & top_p_mask(logits, 0.8))
    draws = jax.vmap(lambda key: sample(logits, key, temperature=1.0, top_k=4, top_p=0.8))(
        jax.random.split(jax.random.key(1), 200))
    draws = np.asarray(draws)
    for b in range(logits.shape[0]):
        assert allowed[b, draws[:, b]].all()
        assert len(set(draws[:, b])) == allowed[b].sum() or allowed[b].sum() > 1  # really random when allowed
    assert any(len(set(draws[:, b])) > 1 for b in range(logits.shape[0]))
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], jax.random.key(0))


def test_cache_bytes_do_not_grow_with_the_context():
    """The cache after a 1k and a 100k prompt, from shapes only (jax.eval_shape: nothing is computed)."""
    model = make("gated_deltanet", 5, 3)
    dec = Decoder(model)
    rng = np.random.default_rng(0)

    def cache_after(T):
        ids = rng.integers(0, 300, size=(2, T)).astype(np.int32)
        return jax.eval_shape(lambda: dec.prefill(ids, chunk=4096)[1])

    small, large = cache_after(1000), cache_after(100_000)
    assert cache_nbytes(small) == cache_nbytes(large) == cache_nbytes(jax.eval_shape(lambda: init_cache(model, 2)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), small) == jax.tree.map(lambda a: (a.shape, a.dtype), large)
    # The teacher's full KV cache does grow (the measure can tell): 2 layers x (k, v) x T x Hkv x D float32.
    t1 = cache_nbytes(jax.eval_shape(lambda: init_cache(model, 1, teacher=True, max_length=1000)))
    t2 = cache_nbytes(jax.eval_shape(lambda: init_cache(model, 1, teacher=True, max_length=2000)))
    assert t2 - t1 == 2 * 2 * 1000 * 2 * 16 * 4 + 1000 * 4  # + ring positions


def test_generate_greedy_matches_the_parallel_forward(capsys):
    import ahn_jax
    from ahn_jax.data.tokenizer import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    model = make("gated_deltanet", 5, 3)
    pieces = []
    out = ahn_jax.generate(model, tok, [{"role": "user", "content": "the fox is 4 . what is the fox ?"}],
                           max_new_tokens=6, temperature=0.0, stream=pieces.append, stop_tokens=[])
    assert "tok/s" in capsys.readouterr().err
    assert len(out.token_ids) <= 6 and "".join(pieces) == out.text
    prompt = tok.apply_chat_template([{"role": "user", "content": "the fox is 4 . what is the fox ?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert out.prompt_tokens == len(ids) > 8  # longer than sinks + window: the memory is used
    chosen = out.token_ids + ([out.stop_token_id] if out.stopped_by == "stop_token" else [])
    assert chosen  # at least one token was picked (possibly a stop token)
    full = jnp.asarray([ids + chosen], jnp.int32)
    greedy = np.argmax(np.asarray(parallel_logits(model, full))[0], -1)
    # Every picked token (the stop token included) is the argmax of the parallel forward at the previous position.
    assert chosen == greedy[len(ids) - 1:len(ids) - 1 + len(chosen)].tolist()


@pytest.mark.parametrize("teacher", [False, True])
def test_greedy_blocks_give_the_token_by_token_result(teacher, monkeypatch):
    """generate's greedy path in device blocks (Decoder.greedy) = one decode call per token: same tokens, text and
    stop, for blocks that end before, at and after max_new_tokens."""
    import ahn_jax
    from ahn_jax.data.tokenizer import load_tiny_tokenizer
    from ahn_jax.inference.decode import Decoder

    blocks = []
    greedy = Decoder.greedy
    monkeypatch.setattr(Decoder, "greedy", lambda self, ids, cache, steps: blocks.append(steps) or
                        greedy(self, ids, cache, steps))

    tok = load_tiny_tokenizer()
    model = make("gated_deltanet", 5, 3)
    prompt = [{"role": "user", "content": "a b c d e f g h i j"}]  # this random model does not stop at once on it
    runs = {b: ahn_jax.generate(model, tok, prompt, max_new_tokens=7, temperature=0.0, stop_tokens=[],
                                greedy_block=b, teacher=teacher, print_stats=False) for b in (1, 3, 7, 16)}
    ref = runs[1]
    assert ref.token_ids
    assert blocks.count(3) == 2 and blocks.count(7) == 1 and blocks.count(16) == 1  # (7 tokens: 1 from the prefill)
    for b, out in runs.items():
        assert (out.token_ids, out.text, out.stopped_by, out.stop_token_id) == \
            (ref.token_ids, ref.text, ref.stopped_by, ref.stop_token_id), b
    # A stop token inside a block: stop at the first generated token of the reference run.
    stop = ref.token_ids[1] if len(ref.token_ids) > 1 else ref.token_ids[0]
    cut = [ahn_jax.generate(model, tok, prompt, max_new_tokens=7, temperature=0.0, stop_tokens=[stop],
                            greedy_block=b, teacher=teacher, print_stats=False) for b in (1, 16)]
    assert cut[0].stopped_by == cut[1].stopped_by == "stop_token"
    assert cut[0].token_ids == cut[1].token_ids == ref.token_ids[:ref.token_ids.index(stop)]
    with pytest.raises(ValueError, match="greedy_block"):
        ahn_jax.generate(model, tok, prompt, max_new_tokens=2, greedy_block=0)


@pytest.fixture
def cli():
    """The CLI module. Importing the submodule ahn_jax.generate binds it on the package in place of the lazy
    function of the same name; the module is callable and forwards to that function."""
    import importlib

    import ahn_jax

    module = importlib.import_module("ahn_jax.generate")
    assert ahn_jax.generate is module and callable(ahn_jax.generate)
    yield module


def test_cli_runs_on_a_tiny_exported_model(tmp_path, capsys, cli):
    from flax import nnx

    from ahn_jax.data.tokenizer import TINY_TOKENIZER_DIR, load_tiny_tokenizer
    from ahn_jax.hf.export import export_hf
    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.qwen import QwenForCausalLM
    from inference_helpers import TINY

    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "--prompt-file" in capsys.readouterr().out
    config = QwenConfig.from_hf(dict(TINY, vocab_size=len(load_tiny_tokenizer())))
    model_dir = export_hf(QwenForCausalLM(config, dtype="float32", rngs=nnx.Rngs(3)), tmp_path / "tiny")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the fox is 4 . the owl is 7 . what is the owl ?", encoding="utf-8")
    args = ["--model", str(model_dir), "--tokenizer", str(TINY_TOKENIZER_DIR), "--window", "6", "--sinks", "2",
            "--memory", "deltanet", "--prompt-file", str(prompt), "--max-new-tokens", "4", "--dtype", "float32",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95", "--seed", "1"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "[prefill]" in captured.err and "[decode]" in captured.err
    with pytest.raises(SystemExit):
        cli.main(["--model", str(model_dir), "--prompt", "x", "--prompt-file", str(prompt)])  # one source only
