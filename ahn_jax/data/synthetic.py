"""Seeded synthetic long-context tasks whose answers depend on tokens far outside a small attention window.

Three tasks, written in the tiny tokenizer's vocabulary (tokenizer.py) and generated directly as token ids (numpy, no
tokenizer library needed; decode(ids) re-encodes to the same ids):

  recall    " the key fox is 4 7 2 ."  ...filler...  " what is fox ? 4 7 2 ."
  multihop  " let va be 5 3 ."  ...  " let vb be va ."  ...  " let vc be vb ."  ...  " what is vc ? 5 3 ."
  copy      " note owl : w1 w2 ... wn end ."  ...filler...  " repeat owl : w1 w2 ... wn end ."

Filler is random sentences of filler words. Every answer token (the digits after "?", the words after "repeat owl :")
is a copy of one earlier token, its *evidence*: the matching digit of the definition / the root binding (multihop), or
the matching word of the passage. So `input_ids[evidence] == input_ids[answer]` always holds, and whether an answer
needs the memory is a property of positions only (see `evidence_beyond_window`).

Conventions: `loss_mask[t]` marks answer *tokens* (unshifted, like HF labels != -100); the prediction of the token at
position t is made by the logits at position t - 1, so an answer "needs the memory" iff the query position t - 1 cannot
attend its evidence (ahn_jax/ops/window.py defines what attention sees).

Knobs (`TaskConfig`; every range is inclusive, sampled uniformly unless said otherwise):
  tasks            which tasks a document mixes (any of "recall", "multihop", "copy").
  fact_prob        chance that the next item is a new fact (a pair, chain root or passage) rather than filler; sets how
                   many facts a document holds (roughly fact_prob / (1 - fact_prob) facts per filler sentence).
  filler_words     words per filler sentence: controls how sparse the facts are.
  value_digits     digits per recall / multihop value (answer length).
  hops             links in a multihop chain after the root (1 = "va=x, vb=va").
  passage_words    words per copied passage.
  distance         tokens between the end of a fact and its query (log-uniform): the evidence distance. Multihop
                   links are spaced by `link_distance` and the query follows the last link by `distance`.
  link_distance    tokens between consecutive multihop bindings (log-uniform).
A document is cut to exactly `length` tokens: items that would not fit are replaced by single filler words, and
queries not yet due are dropped (their facts stay as distractors).
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from ahn_jax.data import tokenizer as tiny

TASKS = ("recall", "multihop", "copy")
SPLITS = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Generator knobs (module docstring). Ranges are (low, high) inclusive."""

    tasks: tuple[str, ...] = TASKS
    fact_prob: float = 0.3
    filler_words: tuple[int, int] = (3, 12)
    value_digits: tuple[int, int] = (2, 4)
    hops: tuple[int, int] = (1, 3)
    passage_words: tuple[int, int] = (3, 8)
    distance: tuple[int, int] = (8, 2048)
    link_distance: tuple[int, int] = (4, 256)

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"TaskConfig.tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        for name in ("filler_words", "value_digits", "hops", "passage_words", "distance", "link_distance"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"TaskConfig.{name} must satisfy 1 <= low <= high, got {(lo, hi)}")
        if not 0.0 < self.fact_prob < 1.0:
            raise ValueError(f"TaskConfig.fact_prob must lie in (0, 1), got {self.fact_prob}")


class _Ids:
    """Token ids of the vocabulary pieces the generator uses (all with a leading space)."""

    def __init__(self):
        w = tiny.word_id
        self.keys = np.array([w(x) for x in tiny.KEY_WORDS])
        self.variables = np.array([w(x) for x in tiny.VARIABLE_WORDS])
        self.filler = np.array([w(x) for x in tiny.FILLER_WORDS])
        self.digits = np.array([w(x) for x in tiny.DIGITS])
        for name in ("the", "key", "what", "let", "be", "note", "repeat", "end"):
            setattr(self, name, w(name))
        self.is_ = w("is")  # `is` is a Python keyword
        self.period, self.colon, self.question = w("."), w(":"), w("?")


_IDS = _Ids()


def _log_uniform(rng, lo, hi):
    """Integer in [lo, hi], log-uniform: short and long distances are equally common per octave."""
    return min(int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))), hi)


def _uniform(rng, lo_hi):
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


class _Builder:
    """Appends items to one document and records (answer position, evidence position, task) triples."""

    def __init__(self, rng, length, cfg):
        self.rng, self.length, self.cfg = rng, length, cfg
        self.tokens: list[int] = []
        self.answers: list[tuple[int, int, int]] = []
        self.pending: list = []  # heap of (due position, sequence number, emit function)
        self._seq = 0
        self.free_keys = list(rng.permutation(_IDS.keys))
        self.free_vars = list(rng.permutation(_IDS.variables))

    def schedule(self, due, emit):
        heapq.heappush(self.pending, (due, self._seq, emit))
        self._seq += 1

    def fits(self, n):
        return len(self.tokens) + n <= self.length

    def append(self, ids, answers_from=None, evidence=None, task=None):
        """Append `ids`; if `answers_from` is given, ids[answers_from:] are answers with these evidence positions."""
        start = len(self.tokens)
        self.tokens.extend(int(i) for i in ids)
        if answers_from is not None:
            for j, e in enumerate(evidence):
                self.answers.append((start + answers_from + j, int(e), TASKS.index(task)))
        return start

    def filler_sentence(self):
        words = self.rng.choice(_IDS.filler, size=_uniform(self.rng, self.cfg.filler_words))
        return list(words) + [_IDS.period]

    # --- facts: each emits its definition now and schedules what follows -------------------------------------------
    def recall_fact(self):
        if not self.free_keys:
            return None
        digits = self.rng.choice(_IDS.digits, size=_uniform(self.rng, self.cfg.value_digits))
        item = [_IDS.the, _IDS.key, self.free_keys[-1], _IDS.is_, *digits, _IDS.period]

        def emit():
            key = self.free_keys.pop()
            start = self.append(item)
            evidence = start + 4 + np.arange(len(digits))
            query = [_IDS.what, _IDS.is_, key, _IDS.question, *digits, _IDS.period]
            self.schedule(len(self.tokens) + self._distance(), lambda: (query, 4, evidence, "recall"))
        return item, emit

    def multihop_fact(self):
        n_hops = _uniform(self.rng, self.cfg.hops)
        if len(self.free_vars) < n_hops + 1:
            return None
        digits = self.rng.choice(_IDS.digits, size=_uniform(self.rng, self.cfg.value_digits))
        item = [_IDS.let, self.free_vars[-1], _IDS.be, *digits, _IDS.period]

        def emit():
            names = [self.free_vars.pop() for _ in range(n_hops + 1)]
            start = self.append(item)
            evidence = start + 3 + np.arange(len(digits))

            def link(k):  # binding names[k] = names[k-1]; the last link schedules the query
                def make():
                    ids = [_IDS.let, names[k], _IDS.be, names[k - 1], _IDS.period]
                    if k == n_hops:
                        query = [_IDS.what, _IDS.is_, names[k], _IDS.question, *digits, _IDS.period]
                        due = len(self.tokens) + len(ids) + self._distance()
                        self.schedule(due, lambda: (query, 4, evidence, "multihop"))
                    else:
                        self.schedule(len(self.tokens) + len(ids) + self._link_distance(), link(k + 1))
                    return ids, None, None, None
                return make
            self.schedule(len(self.tokens) + self._link_distance(), link(1))
        return item, emit

    def copy_fact(self):
        if not self.free_keys:
            return None
        words = self.rng.choice(_IDS.filler, size=_uniform(self.rng, self.cfg.passage_words))
        item = [_IDS.note, self.free_keys[-1], _IDS.colon, *words, _IDS.end, _IDS.period]

        def emit():
            key = self.free_keys.pop()
            start = self.append(item)
            evidence = start + 3 + np.arange(len(words))
            query = [_IDS.repeat, key, _IDS.colon, *words, _IDS.end, _IDS.period]
            self.schedule(len(self.tokens) + self._distance(), lambda: (query, 3, evidence, "copy"))
        return item, emit

    def _distance(self):
        return _log_uniform(self.rng, *self.cfg.distance)

    def _link_distance(self):
        return _log_uniform(self.rng, *self.cfg.link_distance)

    def build(self):
        makers = {"recall": self.recall_fact, "multihop": self.multihop_fact, "copy": self.copy_fact}
        while True:
            if self.pending and self.pending[0][0] <= len(self.tokens):
                _, _, make = heapq.heappop(self.pending)
                ids, answers_from, evidence, task = make()
                # Truncate an answer span never: a query that does not fit ends the document's structured part.
                if not self.fits(len(ids)):
                    break
                self.append(ids, answers_from, evidence, task)
                continue
            if self.rng.random() < self.cfg.fact_prob:
                made = makers[self.cfg.tasks[int(self.rng.integers(len(self.cfg.tasks)))]]()
                if made is not None:
                    item, emit = made
                    if not self.fits(len(item)):
                        break
                    emit()
                    continue
            sentence = self.filler_sentence()
            if not self.fits(len(sentence)):
                break
            self.append(sentence)
        pad = self.length - len(self.tokens)
        self.append(self.rng.choice(_IDS.filler, size=pad))


def _rng(seed, split, index):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


def generate_document(seed, index=0, *, split="train", length=1024, config=TaskConfig()):
    """One document, a pure function of (seed, split, index, length, config).

    Returns a dict of numpy arrays:
      input_ids          int32 [length]
      loss_mask          bool  [length]   True on answer tokens
      answer_positions   int32 [N]        positions of the answer tokens (sorted)
      evidence_positions int32 [N]        the earlier position each answer token copies
      answer_task        int32 [N]        index into TASKS
    """
    if int(length) < 16:
        raise ValueError(f"length must be at least 16 tokens, got {length}")
    b = _Builder(_rng(seed, split, index), int(length), config)
    b.build()
    ids = np.asarray(b.tokens, dtype=np.int32)
    ans = np.asarray(sorted(b.answers), dtype=np.int32).reshape(-1, 3)
    mask = np.zeros(len(ids), dtype=bool)
    mask[ans[:, 0]] = True
    return {"input_ids": ids, "loss_mask": mask, "answer_positions": ans[:, 0].copy(),
            "evidence_positions": ans[:, 1].copy(), "answer_task": ans[:, 2].copy()}


class SyntheticSource:
    """Random-access source of synthetic documents (grain MapDataset.source compatible); record i is deterministic.

    Document lengths are drawn per record in [min_length, max_length] (for the language-modelling stream that trains
    the tiny teacher: mixed tasks, ~256-2048 tokens), or fixed when min_length == max_length. `split="heldout"`
    gives a disjoint random stream for evaluation.
    """

    def __init__(self, num_records, *, seed=0, split="train", min_length=256, max_length=2048,
                 config=TaskConfig()):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        if not 16 <= min_length <= max_length:
            raise ValueError(f"need 16 <= min_length <= max_length, got {min_length}, {max_length}")
        _rng(seed, split, 0)  # validates split
        self.num_records, self.seed, self.split = int(num_records), int(seed), split
        self.min_length, self.max_length, self.config = int(min_length), int(max_length), config

    def __len__(self):
        return self.num_records

    def __getitem__(self, index):
        index = int(index) % self.num_records
        length_rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index, 7]))
        length = int(length_rng.integers(self.min_length, self.max_length + 1))
        return generate_document(self.seed, index, split=self.split, length=length, config=self.config)


def lm_documents(seed=0, *, split="train", min_length=256, max_length=2048, config=TaskConfig()):
    """Endless iterator over the language-modelling stream (mixed tasks, lengths in [min_length, max_length])."""
    source = SyntheticSource(1 << 62, seed=seed, split=split, min_length=min_length, max_length=max_length,
                             config=config)
    index = 0
    while True:
        yield source[index]
        index += 1


def evidence_beyond_window(answer_positions, evidence_positions, window, sinks=0):
    """Bool [N]: is each answer's evidence invisible to the attention of the query that predicts it?

    The answer token at position t is predicted at query position t - 1; its evidence at e is beyond the window iff the
    memory (not attention) holds e for that query: ahn_jax.ops.window.memory_holds(t - 1, e, window, sinks).
    """
    from ahn_jax.ops.window import memory_holds  # the one definition of window/sink semantics (imports jax.numpy)

    t = np.asarray(answer_positions)
    e = np.asarray(evidence_positions)
    return np.asarray(memory_holds(t - 1, e, window, sinks), dtype=bool)
