"""Benchmark loaders, middle truncation, the chat-template choice by config.json model_type, needle generation."""

import json

import numpy as np
import pytest

from ahn_jax.eval import tasks as T
from eval_helpers import FIXTURES


@pytest.fixture(scope="module")
def tokenizer():
    from ahn_jax.data.tokenizer import load_tiny_tokenizer

    return load_tiny_tokenizer()


def test_middle_truncation_keeps_first_and_last_halves():
    ids = list(np.random.default_rng(0).integers(0, 1000, size=37))
    assert T.truncate_tokens(ids, 10) == ids[:5] + ids[-5:]
    assert T.truncate_tokens(ids, 7) == ids[:3] + ids[-4:]  # odd budget: the extra token goes to the tail
    assert T.truncate_tokens(ids, 37) == ids and T.truncate_tokens(ids, 100) == ids
    assert T.truncate_tokens(ids, 6, "left") == ids[-6:]
    with pytest.raises(ValueError, match="truncation mode"):
        T.truncate_tokens(ids, 6, "right")
    with pytest.raises(ValueError, match="max_length"):
        T.truncate_tokens(ids, 0)


def test_longbench_loader_reads_fixture():
    samples = T.longbench_samples(FIXTURES / "longbench", datasets=("hotpotqa", "triviaqa"))
    assert [s.id for s in samples] == ["hotpotqa/hq-0", "hotpotqa/hq-1", "hotpotqa/hq-2", "triviaqa/tq-0",
                                       "triviaqa/tq-1"]
    hq = samples[0]
    assert "the key fox is 4 7 2" in hq.prompt and "what is the key fox?" in hq.prompt
    assert hq.max_new_tokens == 32 and hq.chat and hq.answers == ["4 7 2"]
    assert not samples[3].chat  # triviaqa is few-shot: no chat template
    assert len(T.longbench_samples(FIXTURES / "longbench", datasets=("hotpotqa",), limit=2)) == 2
    assert T.LONGBENCH_MAX_NEW_TOKENS["qmsum"] == 500 and T.LONGBENCH_MAX_NEW_TOKENS["dureader"] == 128


def test_lveval_and_infinitebench_loaders():
    lv = T.lveval_samples(FIXTURES / "lveval", datasets=("cmrc_mixup", "loogle_SD_mixup"), level="16k")
    assert [s.dataset for s in lv] == ["cmrc_mixup", "cmrc_mixup", "loogle_SD_mixup"]
    assert lv[0].fields["answer_keywords"] == "中国" and lv[0].max_new_tokens == 64
    assert len({s.id for s in lv}) == 3
    ib = T.infinitebench_samples(FIXTURES / "infinitebench", splits=("longbook_qa_eng",))
    assert ib[0].answers == ["to the river"] and ib[0].max_new_tokens == 256
    assert ib[0].prompt.startswith("Read the book below and answer a question.")


def test_loader_errors_name_the_file(tmp_path):
    bad = tmp_path / "hotpotqa.jsonl"
    bad.write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(ValueError, match=r"hotpotqa\.jsonl.*answers"):
        T.longbench_samples(tmp_path, datasets=("hotpotqa",))
    bad.write_text('{"input": \n')
    with pytest.raises(ValueError, match=r"hotpotqa\.jsonl:1"):
        T.longbench_samples(tmp_path, datasets=("hotpotqa",))
    with pytest.raises(FileNotFoundError, match="musique"):
        T.longbench_samples(tmp_path, datasets=("musique",))
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        T.longbench_samples(tmp_path, datasets=("nope",))


def test_model_family_comes_from_config_not_directory_name(tmp_path):
    renamed = tmp_path / "my-finetune"  # no "qwen" in the name, still a Qwen2 model
    renamed.mkdir()
    (renamed / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    misleading = tmp_path / "qwen2-lookalike"
    misleading.mkdir()
    (misleading / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert T.model_family(renamed) == "qwen2"
    assert T.model_family(misleading) == "llama"
    assert T.model_family({"model_type": "qwen3"}) == "qwen3"
    with pytest.raises(FileNotFoundError, match="config.json"):
        T.model_family(tmp_path)


def test_prompt_ids_truncate_then_wrap_in_chat_template(tokenizer):
    sample = T.longbench_samples(FIXTURES / "longbench", datasets=("hotpotqa",))[0]
    raw = tokenizer.encode(sample.prompt, add_special_tokens=False)
    budget = 20
    assert len(raw) > budget
    plain = T.prompt_ids(tokenizer, sample, max_length=budget, family="llama")
    assert plain == raw[:10] + raw[-10:]
    chat = T.prompt_ids(tokenizer, sample, max_length=budget, family="qwen2")
    start, end, user, assistant, newline = (tokenizer.convert_tokens_to_ids(t) for t in
                                            ("<|im_start|>", "<|im_end|>", "user", "assistant", "\u010a"))
    # ChatML: <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n around the truncated prompt.
    assert chat[:3] == [start, user, newline]
    assert chat[-5:] == [end, newline, start, assistant, newline]
    assert chat[3:-5] == raw[:10] + raw[-10:]
    no_chat = T.longbench_samples(FIXTURES / "longbench", datasets=("triviaqa",))[0]
    assert T.prompt_ids(tokenizer, no_chat, max_length=10_000, family="qwen2") == \
        tokenizer.encode(no_chat.prompt, add_special_tokens=False)


def test_needles_are_seeded_and_placed_by_depth(tokenizer):
    a = T.needle_samples(tokenizer, lengths=(200,), depths=(0.0, 0.5, 1.0), per_cell=2, seed=3)
    b = T.needle_samples(tokenizer, lengths=(200,), depths=(0.0, 0.5, 1.0), per_cell=2, seed=3)
    c = T.needle_samples(tokenizer, lengths=(200,), depths=(0.0, 0.5, 1.0), per_cell=2, seed=4)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    for s in a:
        value = s.answers[0]
        needle = f"is {value}."
        assert needle in s.prompt and len(value) == 7
        context_len = len(tokenizer.encode(s.prompt, add_special_tokens=False))
        assert context_len >= 200
    # Depth 0 puts the needle first, depth 1 last among the filler sentences.
    first, last = a[0].prompt, a[4].prompt
    body = lambda p: p.split("\n\n")[1]  # noqa: E731
    assert body(first).startswith("The special magic number")
    assert body(last).endswith(f"is {a[4].answers[0]}.")
    assert len({s.id for s in a}) == len(a)
