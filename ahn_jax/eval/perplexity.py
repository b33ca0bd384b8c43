"""Perplexity as a function of token position on long documents, for several model variants side by side.

Each variant is a `logits_fn(ids [T] int32) -> logits [T, V]` (teacher = full attention, window-only, memory). The
negative log-likelihood of token t+1 given the prefix is taken from row t; the log-softmax runs over row chunks in
float32 so no second [T, V] float32 array is built. Per-token NLLs are averaged within position buckets over all
documents, and perplexity per bucket is exp(mean NLL). Positions count the predicted token (1..T-1).

Documents come from local text (a .txt file, a folder of .txt files, or a .jsonl with a "text" field) or a
tensorflow-datasets source such as pg19 (imported lazily: tfds is an optional dependency).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np


class LazyLogits:
    """Logits [T, V] computed on demand, `chunk` rows at a time, from hidden states [T, D] and an LM head function
    (head_fn(h [n, D]) -> [n, V]): at 128k tokens and a 152k vocabulary the full float32 matrix would be ~78 GB.
    Supports exactly what token_nll uses: `.shape` and row slices."""

    def __init__(self, hidden, head_fn, vocab_size: int):
        self.hidden, self.head_fn = hidden, head_fn
        self.shape = (int(hidden.shape[0]), int(vocab_size))

    def __getitem__(self, rows: slice):
        return np.asarray(self.head_fn(self.hidden[rows]))


def token_nll(logits, ids, chunk: int = 1024) -> np.ndarray:
    """logits [T, V] (an array or LazyLogits), ids [T] -> NLL [T - 1] (float64) of ids[1:] given the prefix,
    computed `chunk` rows at a time."""
    ids = np.asarray(ids)
    if logits.shape[0] != ids.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but ids have {ids.shape[0]} tokens")
    out = np.empty(ids.shape[0] - 1, np.float64)
    for start in range(0, ids.shape[0] - 1, chunk):
        stop = min(start + chunk, ids.shape[0] - 1)
        rows = np.asarray(logits[start:stop], np.float32)
        peak = rows.max(axis=-1, keepdims=True)
        log_z = (peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=-1))).astype(np.float64)
        out[start:stop] = log_z - rows[np.arange(stop - start), ids[start + 1:stop + 1]]
    return out


def perplexity_by_position(docs, logits_fns: dict, *, bucket_size: int = 1024, max_length: int | None = None,
                           chunk: int = 1024, log=print) -> dict:
    """docs: iterable of token-id sequences; logits_fns: {variant: logits_fn}.

    Returns {"bucket_size", "max_length", "documents", "bucket_starts": [b0, b1, ...], "variants": {name: {"ppl":
    [per bucket], "tokens": [per bucket], "overall_ppl"}}}. Documents longer than max_length are cut to their first
    max_length tokens; documents shorter than 2 tokens are skipped.
    """
    if not logits_fns:
        raise ValueError("perplexity_by_position needs at least one logits_fn")
    sums = {name: {} for name in logits_fns}
    counts = {name: {} for name in logits_fns}
    n_docs = 0
    for doc in docs:
        ids = np.asarray(doc, np.int32)[:max_length]
        if ids.shape[0] < 2:
            continue
        n_docs += 1
        buckets = np.arange(1, ids.shape[0]) // bucket_size  # the bucket of each predicted position
        for name, fn in logits_fns.items():
            nll = token_nll(fn(ids), ids, chunk)
            for b in np.unique(buckets):
                sel = nll[buckets == b]
                sums[name][int(b)] = sums[name].get(int(b), 0.0) + float(sel.sum())
                counts[name][int(b)] = counts[name].get(int(b), 0) + int(sel.size)
        log(f"  document {n_docs}: {ids.shape[0]} tokens")
    if n_docs == 0:
        raise ValueError("no document with at least 2 tokens")
    n_buckets = 1 + max(max(c) for c in counts.values())
    result = {"bucket_size": bucket_size, "max_length": max_length, "documents": n_docs,
              "bucket_starts": [b * bucket_size for b in range(n_buckets)], "variants": {}}
    for name in logits_fns:
        ppl = [math.exp(sums[name][b] / counts[name][b]) if counts[name].get(b) else float("nan")
               for b in range(n_buckets)]
        total = sum(counts[name].values())
        result["variants"][name] = {"ppl": ppl, "tokens": [counts[name].get(b, 0) for b in range(n_buckets)],
                                    "overall_ppl": math.exp(sum(sums[name].values()) / total)}
    return result


def text_documents(path, limit: int | None = None):
    """Texts from a .txt file, a folder of .txt files (sorted), or a .jsonl file with a "text" field per line."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .txt files")
        texts = (f.read_text(encoding="utf-8") for f in files)
    elif path.suffix == ".jsonl":
        def _jsonl():
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "text" not in record:
                            raise ValueError(f"{path}:{number}: record has no 'text' field")
                        yield record["text"]
        texts = _jsonl()
    elif path.is_file():
        texts = iter([path.read_text(encoding="utf-8")])
    else:
        raise FileNotFoundError(f"document source {path} does not exist")
    for i, text in enumerate(texts):
        if limit is not None and i >= limit:
            return
        yield text


def tfds_documents(name: str = "pg19", split: str = "test", field: str = "book_text", limit: int | None = None,
                   data_dir=None):
    """Texts from a tensorflow-datasets source (downloaded beforehand into data_dir); tfds is imported lazily."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("tfds document source needs tensorflow-datasets (pip install tensorflow-datasets)") from e
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    for i in range(len(source) if limit is None else min(limit, len(source))):
        value = source[i][field]
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tokenize_documents(texts, tokenizer, max_length: int | None = None):
    """Token ids of each text (no special tokens), cut to max_length."""
    for text in texts:
        yield tokenizer.encode(text, add_special_tokens=False)[:max_length]
