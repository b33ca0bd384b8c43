"""Runner: resume skips finished samples, results JSON/markdown, and an end-to-end LongBench run of a tiny model."""

import json

import numpy as np
import pytest

from ahn_jax.eval import metrics as M
from ahn_jax.eval import runner as R
from ahn_jax.eval import tasks as T
from eval_helpers import FIXTURES, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    from ahn_jax.data.tokenizer import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def logits_fn(tokenizer):
    return tiny_model(len(tokenizer), seed=0)[1]


def _counting_generate(tokenizer, calls):
    """A deterministic stand-in model: answers with the last 3 prompt tokens; records each call's prompt."""
    def generate(ids, max_new_tokens):
        calls.append(list(ids))
        return list(ids[-3:])[:max_new_tokens]
    return generate


def test_resume_skips_finished_samples_and_redoes_a_torn_line(tmp_path, tokenizer):
    samples = T.longbench_samples(FIXTURES / "longbench", datasets=("hotpotqa", "triviaqa"))
    kw = dict(benchmark="longbench", out_dir=tmp_path, family="qwen2", max_length=64)
    calls = []
    R.run_benchmark(samples[:2], _counting_generate(tokenizer, calls), tokenizer, log=lambda *_: None, **kw)
    assert len(calls) == 2
    # Simulate a crash in the middle of writing the third sample's line.
    with open(tmp_path / R.PREDICTIONS, "a") as f:
        f.write('{"id": "hotpotqa/hq-2", "pred": "in the')
    calls.clear()
    results = R.run_benchmark(samples, _counting_generate(tokenizer, calls), tokenizer, log=lambda *_: None, **kw)
    assert len(calls) == 3  # hq-2 (torn line), tq-0, tq-1; hq-0 and hq-1 were skipped
    done = R.read_predictions(tmp_path / R.PREDICTIONS)
    assert set(done) == {s.id for s in samples}
    assert results["datasets"]["hotpotqa"]["n"] == 3 and results["datasets"]["triviaqa"]["n"] == 2
    calls.clear()
    R.run_benchmark(samples, _counting_generate(tokenizer, calls), tokenizer, log=lambda *_: None, **kw)
    assert calls == []  # everything finished: nothing runs again


def test_scores_follow_dataset_rules(tmp_path):
    records = [
        {"id": "a", "dataset": "hotpotqa", "pred": "The 4 7 2!", "answers": ["4 7 2"], "fields": {}},
        {"id": "b", "dataset": "hotpotqa", "pred": "nothing", "answers": ["9 1"], "fields": {}},
        {"id": "c", "dataset": "triviaqa", "pred": "3\nsomething else", "answers": ["three", "3"], "fields": {}},
    ]
    res = R.score_predictions(records, "longbench")
    assert res["datasets"]["hotpotqa"] == {"score": 50.0, "n": 2}
    assert res["datasets"]["triviaqa"] == {"score": 100.0, "n": 1}
    assert res["average"] == 75.0
    lv = [{"id": "x", "dataset": "cmrc_mixup", "pred": "中国", "answers": ["中华人民共和国", "中国"],
           "fields": {"answer_keywords": "中国"}}]
    # Only the first reference counts in LV-Eval: 中国 vs 中华人民共和国 -> char F1 = 2*(1 * 2/7)/(1 + 2/7) = 4/9.
    assert R.score_predictions(lv, "lveval")["datasets"]["cmrc_mixup"]["score"] == round(100 * 4 / 9, 2)
    R.write_results(res, tmp_path, title="longbench")
    assert json.loads((tmp_path / "results.json").read_text()) == res
    md = (tmp_path / "results.md").read_text()
    assert "| hotpotqa | 50.00 | 2 |" in md and "| **average** | 75.00 | |" in md
    needle = [{"id": "n", "dataset": "needle_4096", "pred": " It is 1234567.", "answers": ["1234567"], "fields": {}}]
    assert R.score_predictions(needle, "needle")["datasets"]["needle_4096"]["score"] == 100.0
    with pytest.raises(ValueError, match="no metric for dataset"):
        R.score_predictions([{**records[0], "dataset": "nope"}], "longbench")


def _plain_greedy(logits_fn, prompt, steps):
    """Reference greedy decoding: the unpadded sequence every step."""
    seq, new = list(prompt), []
    for _ in range(steps):
        token = int(np.argmax(np.asarray(logits_fn(np.asarray([seq], np.int32)))[0, -1]))
        new.append(token)
        seq.append(token)
    return new


def test_bucketed_greedy_matches_plain_greedy(tokenizer, logits_fn):
    prompt = list(np.random.default_rng(0).integers(5, len(tokenizer), size=13))
    generate = R.greedy_generate_fn(logits_fn, bucket=8)
    expected = _plain_greedy(logits_fn, prompt, 3)
    assert generate(prompt, 3) == expected
    last = R.greedy_generate_fn(last_logits_fn=lambda ids, pos: np.asarray(logits_fn(ids))[0, pos], bucket=8)
    assert last(prompt, 3) == expected
    with pytest.raises(ValueError, match="exactly one"):
        R.greedy_generate_fn()


def test_end_to_end_longbench_tiny_model(tmp_path, tokenizer, logits_fn):
    samples = T.longbench_samples(FIXTURES / "longbench", datasets=("hotpotqa", "triviaqa"))
    for s in samples:
        s.max_new_tokens = 6  # keep the CPU test short; the real lengths are tested in test_tasks
    generate = R.greedy_generate_fn(logits_fn, eos_ids={tokenizer.eos_token_id}, bucket=64)
    results = R.run_benchmark(samples, generate, tokenizer, benchmark="longbench", out_dir=tmp_path,
                              family=T.model_family({"model_type": "qwen2"}), max_length=48, log=lambda *_: None)
    records = R.read_predictions(tmp_path / R.PREDICTIONS)
    assert set(records) == {s.id for s in samples}
    # Each stored prediction is the greedy output (checked against plain greedy above) on the truncated,
    # chat-wrapped prompt, cut at the end-of-text token.
    sample = samples[0]
    ids = T.prompt_ids(tokenizer, sample, max_length=48, family="qwen2")
    expected = generate(ids, 6)
    if tokenizer.eos_token_id in expected:
        expected = expected[:expected.index(tokenizer.eos_token_id)]
    assert records[sample.id]["pred"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert records[sample.id]["prompt_tokens"] == len(ids) and len(ids) > 48  # 48 prompt tokens + chat wrapper
    # The scores are the metric of those predictions.
    hq = [records[s.id] for s in samples if s.dataset == "hotpotqa"]
    expected_hq = M.mean_score(max(M.qa_f1_score(r["pred"], a) for a in r["answers"]) for r in hq)
    assert results["datasets"]["hotpotqa"]["score"] == expected_hq
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()


def test_lveval_and_infinitebench_runs_score_with_their_rules(tmp_path, tokenizer):
    def answer_with(text):
        return lambda ids, n: tokenizer.encode(text, add_special_tokens=False)[:n]

    lv = T.lveval_samples(FIXTURES / "lveval", datasets=("loogle_SD_mixup",), level="16k")
    res = R.run_benchmark(lv, answer_with(" 4 7 2"), tokenizer, benchmark="lveval", out_dir=tmp_path / "lv",
                          family="qwen2", max_length=256, log=lambda *_: None)
    assert res["datasets"]["loogle_SD_mixup"] == {"score": 100.0, "n": 1}
    ib = T.infinitebench_samples(FIXTURES / "infinitebench", splits=("longbook_qa_eng",))
    res = R.run_benchmark(ib, answer_with(" the river"), tokenizer, benchmark="infinitebench",
                          out_dir=tmp_path / "ib", family="llama", max_length=256, log=lambda *_: None)
    # ROUGE-L of "the river" vs "to the river": LCS 2, P = 1, R = 2/3 -> F = 0.8.
    assert res["datasets"]["longbook_qa_eng"] == {"score": 80.0, "n": 1}
