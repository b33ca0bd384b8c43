"""Record sources: accepted formats, and bad records counted and skipped (never raised)."""

import logging

import numpy as np
import pytest

from ahn_jax.data import sources

from data_test_helpers import chatqa2_record, write_jsonl


def test_sharegpt_conversations_and_chatqa_layout_normalise_to_messages():
    conv = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                              {"from": "gpt", "value": "a"}]}
    assert sources.normalize_record(conv)["messages"] == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    chatqa = {"messages": [{"role": "user", "content": "question"}], "document": "doc", "answers": ["ans"]}
    out = sources.normalize_record(chatqa)["messages"]
    assert out == [{"role": "user", "content": "doc\n\nquestion"}, {"role": "assistant", "content": "ans"}]
    assert sources.normalize_record({"text": "hello"}) == {"text": "hello"}


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "no_messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}, "bad_role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]}, "empty_answer"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "bad_role"),
    ({"messages": [{"role": "user"}]}, "bad_message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "bad_content"),
    ({"text": ""}, "empty_text"),
    ({"title": "x"}, "missing_fields"),
])
def test_bad_records_raise_with_a_reason(record, reason):
    with pytest.raises(sources.BadRecord) as e:
        sources.normalize_record(record)
    assert e.value.reason == reason


def test_jsonl_malformed_lines_are_counted_and_skipped(tmp_path, caplog):
    rng = np.random.default_rng(0)
    good = [chatqa2_record(rng) for _ in range(5)]
    rows = [good[0], "{not json", good[1], "", good[2],
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            good[3], '{"messages": [', good[4]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats = sources.RecordStats(log_every=2)
    src = sources.open_source(str(path), stats)
    assert len(src) == len(rows)
    with caplog.at_level(logging.WARNING, logger="ahn_jax.data.sources"):
        read = [src[i] for i in range(len(src))]
    kept = [r for r in read if r is not None]
    assert [r["messages"] for r in kept] == [g["messages"] for g in good]
    assert stats.skipped == {"malformed_json": 2, "empty_line": 1, "empty_answer": 1}
    assert any("malformed_json" in m for m in caplog.messages)


def test_jsonl_without_trailing_newline_and_parquet_and_concat(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    recs = [chatqa2_record(rng) for _ in range(7)]
    path = tmp_path / "a.jsonl"
    write_jsonl(path, recs[:3])
    path.write_text(path.read_text().rstrip("\n"))  # last line has no newline
    table = pa.Table.from_pylist(recs[3:])
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=2)  # several row groups
    src = sources.open_source(str(tmp_path))  # a directory: sorted files, concatenated
    assert len(src) == 7
    assert [src[i]["messages"] for i in range(7)] == [r["messages"] for r in recs]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.open_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no data files"):
        sources.open_source(str(tmp_path / "*.jsonl"))


def test_tfds_source_decodes_bytes_and_counts_bad_rows(monkeypatch):
    """TfdsSource over a stand-in for `tfds.data_source` (a real builder needs prepared array_record files and
    packages this CPU image lacks): bytes fields are decoded, chat and text rows normalised, bad rows counted."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rows = [{"text": b"the fox walked ."}, {"text": b""},
            {"conversations": [{"from": b"human", "value": b"what is fox ?"}, {"from": b"gpt", "value": b"4 2"}]}]
    calls = {}

    def fake_data_source(name, split, data_dir=None):
        calls.update(name=name, split=split)
        return rows

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    stats = sources.RecordStats()
    src = sources.open_source("tfds:my_builder:validation", stats)
    assert calls == {"name": "my_builder", "split": "validation"} and len(src) == 3
    assert src[0] == {"text": "the fox walked ."}
    assert src[1] is None and stats.skipped == {"empty_text": 1}
    assert src[2]["messages"][1] == {"role": "assistant", "content": "4 2"}
