"""The evaluate CLI end to end on a tiny exported checkpoint: LongBench fixture (teacher), ppl, efficiency."""

import json
import numpy as np
import pytest

from ahn_jax import evaluate
from ahn_jax.data.tokenizer import TINY_TOKENIZER_DIR
from eval_helpers import FIXTURES, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The tiny tokenizer is passed with --tokenizer from its own folder: AutoTokenizer on a folder whose config.json says
# model_type qwen2 builds a Qwen2Tokenizer from tokenizer.json (transformers 5), which mangles the WordLevel vocabulary.
TOK = ["--tokenizer", str(TINY_TOKENIZER_DIR)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 exported as an HF checkpoint."""
    from ahn_jax.data.tokenizer import load_tiny_tokenizer
    from ahn_jax.hf.export import export_hf

    out = tmp_path_factory.mktemp("tiny_model") / "renamed-checkpoint"  # no "qwen" in the name on purpose
    model, _ = tiny_model(len(load_tiny_tokenizer()), seed=2)
    export_hf(model, out)
    return out


def test_cli_longbench_teacher_and_resume(model_dir, tmp_path):
    argv = TOK + ["--model", str(model_dir), "--variant", "teacher", "--bench", "longbench", "--data",
            str(FIXTURES / "longbench"), "--datasets", "hotpotqa,triviaqa", "--limit", "1", "--out", str(tmp_path),
            "--max-length", "40", "--dtype", "float32"]
    results = evaluate.main(argv)
    out = tmp_path / "longbench" / "teacher"
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and set(saved["datasets"]) == {"hotpotqa", "triviaqa"}
    assert all(v["n"] == 1 for v in saved["datasets"].values())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # hotpotqa is chat-wrapped (config.json says qwen2, whatever the folder is called): budget 40 + template tokens.
    record = json.loads(lines[0])
    assert record["id"] == "hotpotqa/hq-0" and record["prompt_tokens"] > 40
    evaluate.main(argv)  # a rerun finds everything done and appends nothing
    assert (out / "predictions.jsonl").read_text().splitlines() == lines


def test_cli_ppl_window_covering_the_document_equals_teacher(model_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "fox", "owl", "river", "night", "walked", "to", "and", "cold", "1", "2", "."]
    for i in range(2):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=60)))
    out = tmp_path / "out"
    result = evaluate.main(TOK + ["--model", str(model_dir), "--bench", "ppl", "--data", str(docs), "--out", str(out),
                            "--window", "512", "--sinks", "4", "--ppl-variants", "teacher,window", "--ppl-bucket",
                            "16", "--max-length", "64", "--dtype", "float32"])
    teacher, window = result["variants"]["teacher"], result["variants"]["window"]
    # The CLI's chunked LM head gives the perplexities of the plain full-logits model it was exported from.
    from ahn_jax.data.tokenizer import load_tiny_tokenizer
    from ahn_jax.eval.perplexity import perplexity_by_position, text_documents, tokenize_documents

    _, logits_fn = tiny_model(len(load_tiny_tokenizer()), seed=2)
    docs_ids = list(tokenize_documents(text_documents(docs), load_tiny_tokenizer(), 64))
    direct = perplexity_by_position(docs_ids, {"t": lambda ids: np.asarray(logits_fn(ids[None]))[0]},
                                    bucket_size=16, log=lambda *_: None)["variants"]["t"]
    np.testing.assert_allclose(teacher["ppl"], direct["ppl"], rtol=1e-4)
    # The documents fit inside the window, so window-only attention sees everything: same perplexities.
    np.testing.assert_allclose(window["ppl"], teacher["ppl"], rtol=1e-4)
    assert json.loads((out / "ppl" / "results.json").read_text())["documents"] == 2
    assert (out / "ppl" / "ppl_by_position.png").read_bytes()[:8] == PNG_MAGIC
    # A short window really is a different model: later positions lose context and their perplexity changes.
    short = evaluate.main(TOK + ["--model", str(model_dir), "--bench", "ppl", "--data", str(docs), "--out", str(out),
                           "--window", "4", "--sinks", "1", "--ppl-variants", "window", "--ppl-bucket", "16",
                           "--max-length", "64", "--dtype", "float32"])["variants"]["window"]
    assert not np.allclose(short["ppl"][1:], teacher["ppl"][1:], rtol=1e-3)


def test_cli_efficiency_report(model_dir, tmp_path):
    report = evaluate.main(["--model", str(model_dir), "--bench", "efficiency", "--window", "96", "--sinks", "32",
                            "--memory", "gated_deltanet", "--lengths", "128,1024", "--out", str(tmp_path),
                            "--measure", "no"])
    assert set(report["variants"]) == {"full", "swa", "gated_deltanet"}
    saved = json.loads((tmp_path / "efficiency" / "report.json").read_text())
    assert saved["lengths"] == [128, 1024]
    assert (tmp_path / "efficiency" / "efficiency.png").read_bytes()[:8] == PNG_MAGIC
    assert "gated_deltanet" in (tmp_path / "efficiency" / "report.md").read_text()


def test_cli_errors_are_clear(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="needs --window"):
        evaluate.main(["--model", str(model_dir), "--bench", "longbench", "--data", str(FIXTURES / "longbench"),
                       "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --data"):
        evaluate.main(["--model", str(model_dir), "--variant", "teacher", "--bench", "lveval", "--out",
                       str(tmp_path)])


class _RecomputingCacheModel:
    """A stand-in with the public prefill/decode API whose 'cache' is the token list (logits recomputed in full)."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn

    def prefill(self, ids):
        return self.logits_fn(ids), [int(t) for t in np.asarray(ids)[0]]

    def decode(self, token, cache):
        cache = cache + [int(np.asarray(token)[0, 0])]
        return np.asarray(self.logits_fn(np.asarray([cache], np.int32)))[:, -1], cache  # [1, V] form


def test_cache_decoder_adapter_matches_reference_greedy():
    from ahn_jax.data.tokenizer import load_tiny_tokenizer
    from ahn_jax.eval.runner import greedy_generate_fn

    vocab = len(load_tiny_tokenizer())
    _, logits_fn = tiny_model(vocab, seed=3)
    prompt = list(np.random.default_rng(5).integers(5, vocab, size=9))
    reference = greedy_generate_fn(logits_fn, bucket=16)(prompt, 4)
    cached = evaluate.cached_greedy_generate_fn(_RecomputingCacheModel(logits_fn), eos_ids=set())
    assert cached(prompt, 4) == reference
    # Generation stops at (and includes) an end token, like the reference decoder.
    end = reference[-1]
    stop = evaluate.cached_greedy_generate_fn(_RecomputingCacheModel(logits_fn), eos_ids={end})
    assert stop(prompt, 4) == reference[:reference.index(end) + 1]
