"""The grain input pipeline the trainer calls: `make_pipeline(...)`.

Order of operations (all numpy, in-process by default: DESIGN pitfall 10, no fork after JAX started threads):
  source (sources.py / synthetic.py)  ->  seeded global shuffle, reshuffled each epoch  ->  host shard
  (every process_count-th record of the shuffled order: disjoint, together complete, deterministic)  ->  repeat
  ->  tokenize (chat.py)  ->  drop records with length <= filter_len  ->  truncate to cutoff_len
  ->  drop records with no loss token left  ->  batch and pad to a length bucket.

Batches are dicts of numpy arrays:
  input_ids       int32 [B, T]   padded with pad_id
  loss_mask       bool  [B, T]   targets (answer tokens, or every token in "all" mode); False on padding
  attention_mask  bool  [B, T]   True on real tokens
  lengths         int32 [B]      real tokens per row
plus, for pre-tokenized synthetic records, answer_positions / evidence_positions / answer_task int32 [B, N] padded
with -1. T is the smallest bucket >= the longest row (static shapes: one compiled step per bucket); without buckets
T = cutoff_len, or the longest row when there is no cutoff either.

The iterator is grain's: `it = iter(pipeline)`; `it.get_state()` is a small dict to store in a checkpoint, and
`it.set_state(state)` on a fresh iterator of an identically configured pipeline resumes with exactly the batches an
uninterrupted iterator would have produced next.
"""

from __future__ import annotations

import numpy as np

from ahn_jax.data import chat, sources

# The reference recipe's grid (AHN training: cutoff_len 24576).
DEFAULT_BUCKETS = (2048, 4096, 8192, 16384, 24576)
_EXTRA_FIELDS = ("answer_positions", "evidence_positions", "answer_task")


def bucket_length(length, buckets):
    """Smallest bucket >= length. Raises if the length exceeds every bucket."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


class _Example:
    """Record -> padded-free training example or None (counted in stats). Pure numpy + tokenizer: grain-worker safe."""

    def __init__(self, tokenizer, mask_mode, filter_len, cutoff_len, add_eos, stats):
        self.tokenizer, self.mask_mode, self.add_eos, self.stats = tokenizer, mask_mode, add_eos, stats
        self.filter_len, self.cutoff_len = filter_len, cutoff_len

    def __call__(self, record):
        if record is None:  # already counted by the source
            return None
        try:
            if "input_ids" in record:
                ex = {"input_ids": np.asarray(record["input_ids"], dtype=np.int32)}
                given = record.get("loss_mask")
                use_given = self.mask_mode == "answer" and given is not None
                ex["loss_mask"] = np.asarray(given, bool) if use_given else np.ones(len(ex["input_ids"]), bool)
                ex.update({k: np.asarray(record[k], np.int32) for k in _EXTRA_FIELDS if k in record})
            else:
                if self.tokenizer is None:
                    raise ValueError("records that are not pre-tokenized need a tokenizer")
                ex = chat.tokenize_record(self.tokenizer, record, self.mask_mode, self.add_eos)
        except sources.BadRecord as e:
            self.stats.skip(e.reason, "tokenize")
            return None
        n = len(ex["input_ids"])
        if n <= self.filter_len:
            self.stats.skip("too_short", f"{n} tokens <= filter_len {self.filter_len}")
            return None
        if self.cutoff_len is not None and n > self.cutoff_len:
            ex["input_ids"] = ex["input_ids"][: self.cutoff_len]
            ex["loss_mask"] = ex["loss_mask"][: self.cutoff_len]
            if "answer_positions" in ex:
                keep = ex["answer_positions"] < self.cutoff_len
                for k in _EXTRA_FIELDS:
                    if k in ex:
                        ex[k] = ex[k][keep]
        if not ex["loss_mask"].any():
            self.stats.skip("no_loss_tokens", "no target token left (answers truncated away?)")
            return None
        self.stats.ok()
        return ex


class _PadBatch:
    """List of examples -> one padded batch dict (module docstring)."""

    def __init__(self, buckets, cutoff_len, pad_id):
        self.buckets, self.cutoff_len, self.pad_id = buckets, cutoff_len, pad_id

    def __call__(self, examples):
        lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int32)
        if self.buckets:
            t = bucket_length(int(lengths.max()), self.buckets)
        else:
            t = self.cutoff_len if self.cutoff_len is not None else int(lengths.max())
        b = len(examples)
        out = {"input_ids": np.full((b, t), self.pad_id, np.int32), "loss_mask": np.zeros((b, t), bool)}
        for i, e in enumerate(examples):
            out["input_ids"][i, : lengths[i]] = e["input_ids"]
            out["loss_mask"][i, : lengths[i]] = e["loss_mask"]
        out["attention_mask"] = np.arange(t)[None, :] < lengths[:, None]
        out["lengths"] = lengths
        for k in _EXTRA_FIELDS:
            if all(k in e for e in examples):
                n = max(len(e[k]) for e in examples)
                out[k] = np.full((b, n), -1, np.int32)
                for i, e in enumerate(examples):
                    out[k][i, : len(e[k])] = e[k]
        return out


class Pipeline:
    """A configured grain pipeline. `iter(p)` -> checkpointable iterator; `p.stats` -> skip/used counts."""

    def __init__(self, dataset, stats):
        self.dataset, self.stats = dataset, stats

    def __iter__(self):
        return iter(self.dataset)


def make_pipeline(*, source, tokenizer=None, mask_mode="answer", batch_size=1, filter_len=0, cutoff_len=None,
                  buckets=None, seed=0, shuffle=True, num_epochs=None, process_index=None, process_count=None,
                  drop_remainder=True, num_threads=0, prefetch_buffer_size=64, pad_id=None, add_eos=True,
                  text_field="text", stats=None):
    """Build the training input pipeline.

    Args:
      source: a source spec for `sources.open_source` (path, glob, directory, "tfds:NAME[:SPLIT]", or a list), or
        any random-access sequence of records (e.g. synthetic.SyntheticSource).
      tokenizer: a HF fast tokenizer with a chat template (may be None for pre-tokenized records).
      mask_mode: "answer" (assistant tokens / synthetic answers) or "all" (every token).
      batch_size: rows per batch on this host.
      filter_len: drop records whose tokenized length is <= filter_len (reference: 288).
      cutoff_len: truncate longer records to this many tokens (reference: 24576); None keeps everything.
      buckets: allowed padded lengths (e.g. DEFAULT_BUCKETS); must cover cutoff_len. None: pad to cutoff_len.
      seed: shuffle seed; every host must use the same one (the shard is taken after the global shuffle).
      shuffle: False keeps the source order (evaluation).
      num_epochs: None repeats forever; an int stops after that many passes over this host's shard.
      process_index, process_count: host sharding; default: jax.process_index() / jax.process_count().
      drop_remainder: drop a last partial batch (keeps the batch shape static).
      num_threads, prefetch_buffer_size: grain in-process reader threads (0 = read in the calling thread).
      pad_id: padding token id; default the tokenizer's pad (else eos) id, else 0.
      add_eos: append eos to plain-text documents.
      text_field: field name of plain-text records.
      stats: a sources.RecordStats to share; a new one by default (exposed as `pipeline.stats`).
    """
    import grain

    if mask_mode not in chat.MASK_MODES:
        raise ValueError(f"mask_mode must be one of {chat.MASK_MODES}, got {mask_mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cutoff_len is not None and cutoff_len <= filter_len:
        raise ValueError(f"cutoff_len ({cutoff_len}) must exceed filter_len ({filter_len})")
    if buckets:
        buckets = tuple(sorted(int(b) for b in buckets))
        if cutoff_len is None or cutoff_len > buckets[-1]:
            raise ValueError(f"buckets {buckets} must cover cutoff_len ({cutoff_len}): set cutoff_len <= {buckets[-1]}")
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the pipeline itself is numpy

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if pad_id is None:
        pad_id = 0
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    stats = stats if stats is not None else sources.RecordStats()
    src = sources.open_source(source, stats, text_field) if isinstance(source, (str, list, tuple)) or hasattr(
        source, "__fspath__") else source
    if len(src) < process_count:
        raise ValueError(f"source has {len(src)} records, fewer than process_count={process_count}")

    ds = grain.MapDataset.source(src)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count]
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the upstream shuffle each epoch
    ds = ds.map(_Example(tokenizer, mask_mode, filter_len, cutoff_len, add_eos, stats))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    it_ds = ds.to_iter_dataset(read)  # drops the None (skipped) records
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_PadBatch(buckets, cutoff_len, pad_id))
    return Pipeline(it_ds, stats)
