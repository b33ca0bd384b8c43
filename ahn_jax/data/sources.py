"""Random-access record sources: sharegpt/ChatQA2 JSONL or parquet, plain-text JSONL, tensorflow-datasets builders.

Every source is a sequence (`len`, `[i]`) usable by `grain.MapDataset.source`. `source[i]` returns a *normalised*
record or None when the stored record is bad; bad records are counted in a shared `RecordStats` (never raised), so a
corrupt line or an empty answer never ends a training run. Normalised records are one of:
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   chat (answers carry the loss)
  {"text": str}                                                              plain text (every token carries loss)
Accepted stored forms:
  - sharegpt / ChatQA2 long-SFT: `messages` = list of {role, content}; or `conversations` = list of {from, value} with
    from in human/user, gpt/assistant/model, system. A top-level `system` string becomes the first message.
  - NVIDIA ChatQA layout: additionally `document` (context, prepended to the first user turn) and `answers` (list of
    strings; the first is appended as the final assistant turn when the messages end with a user turn).
  - plain text: a `text` string (field name configurable).
A chat record is bad when: the list is missing/empty/not a list, a role is unknown, a system message is not first,
content is not a string, it has no assistant turn, or any assistant answer is empty (whitespace only).
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import logging
import os
import threading

log = logging.getLogger(__name__)

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant", "bot": "assistant"}


class BadRecord(ValueError):
    """A stored record that cannot be used; `reason` is a short key for RecordStats."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class RecordStats:
    """Thread-safe counts of used and skipped records, by reason. Logs the first skip of each reason, then one
    summary warning every `log_every` skips, so a corrupt dataset is visible without flooding the log."""

    def __init__(self, log_every=1000):
        self.log_every = int(log_every)
        self._lock = threading.Lock()
        self.skipped = collections.Counter()
        self.used = 0

    def ok(self):
        with self._lock:
            self.used += 1

    def skip(self, reason, where=""):
        with self._lock:
            self.skipped[reason] += 1
            first = self.skipped[reason] == 1
            total = sum(self.skipped.values())
        if first:
            log.warning("skipping bad record (%s) at %s; further ones are counted", reason, where)
        elif total % self.log_every == 0:
            log.warning("skipped %d bad records so far: %s", total, dict(self.skipped))

    @property
    def total_skipped(self):
        return sum(self.skipped.values())

    def as_dict(self):
        with self._lock:
            return {"used": self.used, "skipped": dict(self.skipped)}


def _chat_from_pairs(turns, role_key, content_key):
    if not isinstance(turns, list) or not turns:
        raise BadRecord("no_messages", "messages must be a non-empty list")
    out = []
    for t in turns:
        if not isinstance(t, dict) or role_key not in t or content_key not in t:
            raise BadRecord("bad_message", f"each message needs {role_key!r} and {content_key!r}")
        role = ROLE_ALIASES.get(str(t[role_key]).lower())
        if role is None:
            raise BadRecord("bad_role", f"unknown role {t[role_key]!r}")
        if not isinstance(t[content_key], str):
            raise BadRecord("bad_content", f"content of a {role} message is {type(t[content_key]).__name__}")
        out.append({"role": role, "content": t[content_key]})
    return out


def normalize_record(obj, text_field="text"):
    """Stored record (dict) -> normalised record (module docstring). Raises BadRecord."""
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"record is {type(obj).__name__}")
    if "messages" in obj:
        messages = _chat_from_pairs(obj["messages"], "role", "content")
    elif "conversations" in obj:
        messages = _chat_from_pairs(obj["conversations"], "from", "value")
    elif text_field in obj:
        text = obj[text_field]
        if not isinstance(text, str) or not text.strip():
            raise BadRecord("empty_text", f"field {text_field!r} is empty or not a string")
        return {"text": text}
    else:
        raise BadRecord("missing_fields", f"no 'messages', 'conversations' or {text_field!r} field")

    if isinstance(obj.get("system"), str) and obj["system"].strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": obj["system"]})
    document = obj.get("document")
    if isinstance(document, str) and document.strip():
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = document + "\n\n" + first_user["content"]
    answers = obj.get("answers")
    if messages[-1]["role"] == "user" and isinstance(answers, list) and answers:
        if not isinstance(answers[0], str):
            raise BadRecord("bad_content", "answers[0] is not a string")
        messages.append({"role": "assistant", "content": answers[0]})

    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRecord("bad_role", "a system message that is not the first message")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadRecord("no_answer", "no assistant message")
    if any(not m["content"].strip() for m in assistants):
        raise BadRecord("empty_answer", "an assistant message is empty")
    if not any(m["role"] == "user" for m in messages):
        raise BadRecord("no_prompt", "no user message")
    return {"messages": messages}


class JsonlSource:
    """Lines of one JSONL file, random access by a byte-offset index built once (no file is loaded into memory)."""

    def __init__(self, path, stats=None, text_field="text"):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"JSONL file not found: {self.path}")
        self.stats = stats if stats is not None else RecordStats()
        self.text_field = text_field
        self._starts, self._ends = self._index()
        self._fd = os.open(self.path, os.O_RDONLY)

    def _index(self):
        starts, ends, pos = [], [], 0
        line_start = 0
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 24):
                at = chunk.find(b"\n")
                while at != -1:
                    starts.append(line_start)
                    ends.append(pos + at)
                    line_start = pos + at + 1
                    at = chunk.find(b"\n", at + 1)
                pos += len(chunk)
        if line_start < pos:  # last line without a trailing newline
            starts.append(line_start)
            ends.append(pos)
        return starts, ends

    def __len__(self):
        return len(self._starts)

    def __getitem__(self, i):
        start, end = self._starts[i], self._ends[i]
        where = f"{self.path}:{i + 1}"
        try:
            raw = os.pread(self._fd, end - start, start)  # pread: safe from several reader threads at once
            line = raw.decode("utf-8").strip()
            if not line:
                raise BadRecord("empty_line")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecord("malformed_json", str(e)) from None
            record = normalize_record(obj, self.text_field)
        except (BadRecord, UnicodeDecodeError) as e:
            self.stats.skip(getattr(e, "reason", "bad_encoding"), where)
            return None
        return record

    def __getstate__(self):  # picklable for grain worker processes: reopen the file there
        state = dict(self.__dict__)
        state.pop("_fd")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)


class ParquetSource:
    """Rows of one parquet file (pyarrow), random access through a small cache of decoded row groups."""

    def __init__(self, path, stats=None, text_field="text"):
        import pyarrow.parquet as pq

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"parquet file not found: {self.path}")
        self.stats = stats if stats is not None else RecordStats()
        self.text_field = text_field
        meta = pq.ParquetFile(self.path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._group_starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self._len = sum(sizes)
        self._lock = threading.Lock()
        self._cache = collections.OrderedDict()

    def __len__(self):
        return self._len

    def _group(self, g):
        import pyarrow.parquet as pq

        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        rows = pq.ParquetFile(self.path).read_row_group(g).to_pylist()
        with self._lock:
            self._cache[g] = rows
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return rows

    def __getitem__(self, i):
        g = bisect.bisect_right(self._group_starts, i) - 1
        try:
            return normalize_record(self._group(g)[i - self._group_starts[g]], self.text_field)
        except BadRecord as e:
            self.stats.skip(e.reason, f"{self.path}:row {i}")
            return None


class TfdsSource:
    """A tensorflow-datasets builder read through `tfds.data_source` (random access; needs the dataset prepared in
    array_record format). Bytes fields are decoded as UTF-8 before normalisation. tfds is imported lazily: slow."""

    def __init__(self, name, split="train", data_dir=None, stats=None, text_field="text"):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self.stats = stats if stats is not None else RecordStats()
        self.text_field = text_field
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        def decode(x):
            if isinstance(x, bytes):
                return x.decode("utf-8", errors="replace")
            if isinstance(x, dict):
                return {k: decode(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [decode(v) for v in x]
            if hasattr(x, "tolist"):
                return decode(x.tolist())
            return x
        try:
            return normalize_record(decode(self._source[i]), self.text_field)
        except BadRecord as e:
            self.stats.skip(e.reason, f"tfds:{self.name}/{self.split}[{i}]")
            return None


class ConcatSource:
    """Several sources read as one (file order, then row order)."""

    def __init__(self, sources):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = list(sources)
        self._starts = [0]
        for s in self.sources:
            self._starts.append(self._starts[-1] + len(s))

    def __len__(self):
        return self._starts[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self._starts, i) - 1
        return self.sources[k][i - self._starts[k]]


def open_source(spec, stats=None, text_field="text"):
    """Spec -> source. `spec` is "tfds:NAME[:SPLIT]", a .jsonl/.json/.parquet path, a glob, a directory (all such
    files in it, sorted), or a list of these. Files are sorted so every host sees the same order."""
    stats = stats if stats is not None else RecordStats()
    if isinstance(spec, (list, tuple)):
        return ConcatSource([open_source(s, stats, text_field) for s in spec])
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsSource(name, split or "train", stats=stats, text_field=text_field)
    if os.path.isdir(spec):
        paths = sorted(p for ext in ("jsonl", "json", "parquet") for p in glob.glob(os.path.join(spec, f"*.{ext}")))
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec]
    if not paths:
        raise FileNotFoundError(f"no data files match {spec!r}")
    opened = []
    for p in paths:
        if p.endswith(".parquet"):
            opened.append(ParquetSource(p, stats, text_field))
        elif p.endswith((".jsonl", ".json")):
            opened.append(JsonlSource(p, stats, text_field))
        else:
            raise ValueError(f"unsupported data file type (want .jsonl, .json or .parquet): {p}")
    return opened[0] if len(opened) == 1 else ConcatSource(opened)
