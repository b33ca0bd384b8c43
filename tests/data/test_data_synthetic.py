"""Synthetic long-context tasks and the shipped tiny tokenizer."""

import json
import os

import numpy as np
import pytest

from ahn_jax.data import synthetic, tokenizer as tiny
from ahn_jax.data.synthetic import TASKS, SyntheticSource, TaskConfig, evidence_beyond_window, generate_document

TOK = tiny.load_tiny_tokenizer()
ID = {v: k for k, v in tiny.vocab().items()}


def _word(i):
    return ID[int(i)].replace("\u0120", "")


def test_shipped_tokenizer_matches_the_builder_and_is_small():
    files = {p: (tiny.TINY_TOKENIZER_DIR / p) for p in ("tokenizer.json", "tokenizer_config.json")}
    assert sum(f.stat().st_size for f in files.values()) < 1 << 20
    assert json.loads(files["tokenizer.json"].read_text()) == json.loads(tiny.build_tiny_tokenizer().to_str())
    assert json.loads(files["tokenizer_config.json"].read_text()) == tiny.tokenizer_config()
    assert 200 <= len(TOK) <= 1000


def test_shipped_tokenizer_loads_offline_and_round_trips(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(tiny.TINY_TOKENIZER_DIR))
    rng = np.random.default_rng(0)
    pieces = list(tiny.base_words())
    for _ in range(20):
        words = rng.choice(pieces, size=int(rng.integers(1, 30)))
        seps = rng.choice([" ", "", "\n", "  "], size=len(words))
        # Two letter-words need a separator (glued they would be one unknown word); digits and punctuation do not.
        seps = [" " if s == "" and i and words[i].isalpha() and words[i - 1].isalpha() else s
                for i, s in enumerate(seps)]
        text = "".join(s + w for s, w in zip(seps, words))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    messages = [{"role": "user", "content": "what is fox ?"}, {"role": "assistant", "content": "4 2"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nwhat is fox ?<|im_end|>\n<|im_start|>assistant\n4 2<|im_end|>\n"
    assert tok.decode(tok(rendered, add_special_tokens=False)["input_ids"]) == rendered
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id


def test_documents_are_deterministic_per_seed_and_split():
    a = generate_document(3, 5, length=700)
    b = generate_document(3, 5, length=700)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_ids"], generate_document(4, 5, length=700)["input_ids"])
    assert not np.array_equal(a["input_ids"], generate_document(3, 6, length=700)["input_ids"])
    assert not np.array_equal(a["input_ids"], generate_document(3, 5, split="heldout", length=700)["input_ids"])
    src = SyntheticSource(50, seed=1, min_length=256, max_length=2048)
    lengths = [len(src[i]["input_ids"]) for i in range(20)]
    assert min(lengths) >= 256 and max(lengths) <= 2048 and len(set(lengths)) > 10
    np.testing.assert_array_equal(src[7]["input_ids"], SyntheticSource(50, seed=1)[7]["input_ids"])


def _check_evidence(doc):
    """Every answer token copies its evidence token, and the evidence is where the task says the answer comes from."""
    ids = doc["input_ids"]
    ans, ev, task = doc["answer_positions"], doc["evidence_positions"], doc["answer_task"]
    assert len(ans) > 0 and (ev < ans).all()
    np.testing.assert_array_equal(ids[ans], ids[ev])
    np.testing.assert_array_equal(np.flatnonzero(doc["loss_mask"]), ans)
    words = [_word(i) for i in ids]
    for a, e, t in zip(ans, ev, task):
        # Walk back from the answer token to its query header, and from the evidence to its definition header.
        q = a
        while words[q] not in ("?", ":"):
            q -= 1
        offset = a - q - 1
        if TASKS[t] == "recall":       # ... what is KEY ? d0 d1 ...   /   the key KEY is d0 d1 ... .
            key = words[q - 1]
            assert words[e - offset - 4: e - offset] == ["the", "key", key, "is"]
        elif TASKS[t] == "copy":       # repeat KEY : w0 w1 ...   /   note KEY : w0 w1 ...
            assert words[q - 2] == "repeat" and words[e - offset - 3: e - offset] == ["note", words[q - 1], ":"]
        else:                          # what is vN ? d...  /  let vN be vM . ... let v0 be d0 d1 ... .
            name, hops = words[q - 1], 0
            while True:
                starts = [i for i in range(len(words) - 3) if words[i: i + 3] == ["let", name, "be"]]
                assert len(starts) == 1, f"variable {name} bound {len(starts)} times"
                value = words[starts[0] + 3]
                if value.startswith("v"):
                    name, hops = value, hops + 1
                    continue
                assert starts[0] + 3 + offset == e and hops >= 1
                break


@pytest.mark.parametrize("tasks", [("recall",), ("multihop",), ("copy",), TASKS])
def test_evidence_positions_are_correct_and_answers_derivable(tasks):
    cfg = TaskConfig(tasks=tasks)
    for index in range(4):
        doc = generate_document(11, index, length=1500, config=cfg)
        assert set(np.unique(doc["answer_task"])) <= {TASKS.index(t) for t in tasks}
        _check_evidence(doc)


def test_answers_beyond_a_small_window_exist_and_the_split_follows_window_semantics():
    doc = generate_document(0, 0, length=2048)
    ans, ev = doc["answer_positions"], doc["evidence_positions"]
    beyond = evidence_beyond_window(ans, ev, window=64, sinks=4)
    assert beyond.any() and (~beyond).any()
    np.testing.assert_array_equal(beyond, (ans - 1 - ev >= 64) & (ev >= 4))
    assert not evidence_beyond_window(ans, ev, window=4096, sinks=0).any()
    # The distance knob controls how far evidence lies: short distances keep every answer inside a 64-token window.
    near = TaskConfig(tasks=("recall", "copy"), distance=(1, 8))
    for index in range(3):
        d = generate_document(0, index, length=1024, config=near)
        assert len(d["answer_positions"]) > 20
        assert not evidence_beyond_window(d["answer_positions"], d["evidence_positions"], window=64).any()


def test_generation_is_fast_and_round_trips_through_the_tokenizer():
    import time

    t0 = time.perf_counter()
    docs = [generate_document(5, i, length=2048) for i in range(10)]
    assert time.perf_counter() - t0 < 5.0
    for d in docs[:3]:
        text = TOK.decode(d["input_ids"])
        assert TOK(text, add_special_tokens=False)["input_ids"] == d["input_ids"].tolist()


def test_bad_knobs_are_clear_errors():
    with pytest.raises(ValueError, match="tasks"):
        TaskConfig(tasks=("sorting",))
    with pytest.raises(ValueError, match="distance"):
        TaskConfig(distance=(10, 5))
    with pytest.raises(ValueError, match="split"):
        generate_document(0, split="test")
    assert os.path.isdir(synthetic.tiny.TINY_TOKENIZER_DIR)
