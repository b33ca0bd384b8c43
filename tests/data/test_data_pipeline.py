"""The grain pipeline: filter/cutoff, buckets and padding, host sharding, seeded shuffle, resumable iterator."""

import itertools

import numpy as np
import pytest

from ahn_jax.data import chat, sources
from ahn_jax.data.pipeline import bucket_length, make_pipeline
from ahn_jax.data.synthetic import SyntheticSource
from ahn_jax.data.tokenizer import load_tiny_tokenizer

from data_test_helpers import chatqa2_record, random_words, write_jsonl

TOK = load_tiny_tokenizer()


def _rows(batches):
    """Unpadded (input_ids, loss_mask) rows of a list of batches, checking the padding invariants on the way."""
    out = []
    for b in batches:
        assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == bool
        for ids, mask, att, n in zip(b["input_ids"], b["loss_mask"], b["attention_mask"], b["lengths"]):
            assert att[:n].all() and not att[n:].any()
            assert not mask[n:].any() and (ids[n:] == TOK.pad_token_id).all()
            out.append((tuple(ids[:n].tolist()), tuple(mask[:n].tolist())))
    return out


def _chat_file(tmp_path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    recs = [chatqa2_record(rng, context_words=(5, 120), turns=int(rng.integers(1, 3))) for _ in range(n)]
    return write_jsonl(tmp_path / "chat.jsonl", recs), recs


def _tokenized(rec, mode="answer"):
    ex = chat.tokenize_messages(TOK, sources.normalize_record(rec)["messages"], mode)
    return tuple(ex["input_ids"].tolist()), tuple(ex["loss_mask"].tolist())


def test_filter_len_drops_short_records_and_cutoff_truncates(tmp_path):
    path, recs = _chat_file(tmp_path)
    lengths = np.array([len(_tokenized(r)[0]) for r in recs])
    # filter_len equal to a real length: that record must go (the rule is length <= filter_len).
    filter_len, cutoff = int(np.sort(lengths)[7]), int(np.percentile(lengths, 70))
    pipe = make_pipeline(source=str(path), tokenizer=TOK, batch_size=1, filter_len=filter_len, cutoff_len=cutoff,
                         shuffle=False, num_epochs=1, process_index=0, process_count=1, drop_remainder=False)
    got = _rows(list(pipe))
    want = []
    for r, n in zip(recs, lengths):
        if n <= filter_len:
            continue
        ids, mask = _tokenized(r)
        if any(mask[:cutoff]):
            want.append((ids[:cutoff], mask[:cutoff]))
    assert got == want and len(got) > 0
    assert pipe.stats.skipped["too_short"] == int((lengths <= filter_len).sum())


def test_bad_lines_and_empty_answers_never_end_the_run(tmp_path):
    rng = np.random.default_rng(3)
    good = [chatqa2_record(rng) for _ in range(6)]
    empty = {"messages": [{"role": "user", "content": "what is fox ?"}, {"role": "assistant", "content": " "}]}
    rows = [good[0], "{broken", good[1], empty, good[2], "[1, 2", good[3], good[4], "", good[5]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    pipe = make_pipeline(source=str(path), tokenizer=TOK, batch_size=2, shuffle=False, num_epochs=1,
                         process_index=0, process_count=1)
    got = _rows(list(pipe))
    assert got == [_tokenized(r) for r in good]
    assert pipe.stats.as_dict() == {"used": 6, "skipped": {"malformed_json": 2, "empty_answer": 1, "empty_line": 1}}


def test_buckets_pad_to_the_smallest_covering_length(tmp_path):
    path, recs = _chat_file(tmp_path, n=16, seed=5)
    buckets = (64, 128, 256)
    pipe = make_pipeline(source=str(path), tokenizer=TOK, batch_size=2, cutoff_len=256, buckets=buckets, seed=1,
                         num_epochs=1, process_index=0, process_count=1)
    batches = list(pipe)
    assert len(batches) == 8
    for b in batches:
        assert b["input_ids"].shape[1] == bucket_length(int(b["lengths"].max()), buckets)
    assert sorted(_rows(batches)) == sorted(_tokenized(r) for r in recs)
    with pytest.raises(ValueError, match="buckets"):
        make_pipeline(source=str(path), tokenizer=TOK, cutoff_len=512, buckets=buckets, process_index=0,
                      process_count=1)
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_length(300, buckets)


def test_plain_text_jsonl_masks_every_token(tmp_path):
    rng = np.random.default_rng(7)
    texts = [random_words(rng, int(rng.integers(10, 40))) for _ in range(6)]
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    pipe = make_pipeline(source=str(path), tokenizer=TOK, batch_size=3, cutoff_len=64, shuffle=False, num_epochs=1,
                         process_index=0, process_count=1)
    rows = _rows(list(pipe))
    assert [TOK.decode(ids) for ids, _ in rows] == [t + TOK.eos_token for t in texts]
    assert all(all(mask) for _, mask in rows)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_host_shards_partition_the_data(tmp_path, num_threads):
    texts = [f"the key {w} is {i} ." for i, w in enumerate(np.random.default_rng(0).choice(["fox", "owl"], 23))]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    shards = []
    for host in range(3):
        pipe = make_pipeline(source=str(path), tokenizer=TOK, batch_size=1, cutoff_len=32, seed=11, num_epochs=1,
                             process_index=host, process_count=3, num_threads=num_threads, drop_remainder=False)
        shards.append([TOK.decode(ids[:-1]) for ids, _ in _rows(list(pipe))])
    flat = list(itertools.chain(*shards))
    assert sorted(flat) == sorted(texts) and len(flat) == len(set(flat))  # disjoint and complete
    assert flat != texts  # shuffled
    again = make_pipeline(source=str(path), tokenizer=TOK, batch_size=1, cutoff_len=32, seed=11, num_epochs=1,
                          process_index=1, process_count=3, drop_remainder=False)
    assert [TOK.decode(ids[:-1]) for ids, _ in _rows(list(again))] == shards[1]  # deterministic


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_resumes_identically_across_epochs(tmp_path, num_threads):
    path, _ = _chat_file(tmp_path, n=10, seed=9)
    # One malformed line, so the resumed position must account for skipped records.
    with open(path, "a") as f:
        f.write("{oops\n")

    def pipe():
        return make_pipeline(source=str(path), tokenizer=TOK, batch_size=3, cutoff_len=256, buckets=(128, 256),
                             seed=4, process_index=0, process_count=1, num_threads=num_threads)

    it = iter(pipe())
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(6)]  # crosses two epoch boundaries (10 good records, 3 per batch)
    resumed = iter(pipe())
    resumed.set_state(state)
    again = [next(resumed) for _ in range(6)]
    for a, b in zip(rest, again):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Each epoch is reshuffled: the first 9 rows of epochs 1 and 2 are not in the same order.
    rows = _rows(first + rest)
    assert rows[:9] != rows[10:19]


def test_synthetic_source_answer_mode_and_truncated_evidence():
    src = SyntheticSource(6, seed=2, min_length=200, max_length=300)
    pipe = make_pipeline(source=src, tokenizer=TOK, batch_size=2, cutoff_len=160, shuffle=False, num_epochs=1,
                         process_index=0, process_count=1)
    for i, b in enumerate(pipe):
        for r in range(2):
            doc = src[2 * i + r]
            np.testing.assert_array_equal(b["loss_mask"][r], doc["loss_mask"][:160])
            keep = doc["answer_positions"] < 160
            n = int(keep.sum())
            np.testing.assert_array_equal(b["evidence_positions"][r, :n], doc["evidence_positions"][keep])
            assert (b["answer_positions"][r, n:] == -1).all()
    lm = make_pipeline(source=src, mask_mode="all", batch_size=2, cutoff_len=160, shuffle=False, num_epochs=1,
                       process_index=0, process_count=1)
    assert next(iter(lm))["loss_mask"].all()
