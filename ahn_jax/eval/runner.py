"""Run a benchmark with any `generate_fn`, resumably, and score it.

The model is hidden behind `generate_fn(prompt_ids: list[int], max_new_tokens: int) -> list[int]` (the new tokens
only), so this file knows nothing about model code. Predictions go to an append-only JSONL file, one line per sample,
keyed by sample id, flushed after each sample: a restarted run reads it and skips the finished ids. A line cut short by
a crash is ignored (its sample runs again). Results are written as JSON and as a markdown table, each to a temporary
name first and then renamed, so no half-written result file is left behind.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

import numpy as np

from ahn_jax.eval import metrics as M
from ahn_jax.eval.tasks import Sample, prompt_ids

PREDICTIONS = "predictions.jsonl"


def metric_rules(benchmark: str, dataset: str):
    """(metric, first_line, first_reference_only) of one dataset of a benchmark."""
    if benchmark == "longbench":
        table, first_line, first_ref = M.LONGBENCH_METRICS, dataset in M.LONGBENCH_FIRST_LINE, False
    elif benchmark == "lveval":
        table, first_line, first_ref = M.LVEVAL_METRICS, False, True  # LV-Eval scores only the first reference
    elif benchmark == "infinitebench":
        table, first_line, first_ref = M.INFINITEBENCH_METRICS, False, False
    elif benchmark == "needle":
        return M.string_match_all, False, False
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    if dataset not in table:
        raise ValueError(f"{benchmark} has no metric for dataset {dataset!r}")
    return table[dataset], first_line, first_ref


def read_predictions(path) -> dict[str, dict]:
    """{id: record} of a predictions JSONL; a later line for the same id wins; an unparsable line is skipped."""
    done = {}
    path = pathlib.Path(path)
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the tail of a run killed mid-write; that sample is simply redone
            if isinstance(record, dict) and "id" in record:
                done[record["id"]] = record
    return done


def _atomic_write(path: pathlib.Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _strip_eos(tokens, eos_ids) -> list[int]:
    out = []
    for t in tokens:
        if int(t) in eos_ids:
            break
        out.append(int(t))
    return out


def run_benchmark(samples: list[Sample], generate_fn, tokenizer, *, benchmark: str, out_dir, family: str,
                  max_length: int, truncation: str = "middle", eos_ids=None, log=print) -> dict:
    """Generate a prediction for every sample not already in <out_dir>/predictions.jsonl, then score all of them.

    Returns the results dict (also written to results.json / results.md in out_dir).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / PREDICTIONS
    done = read_predictions(pred_path)
    sample_ids = [s.id for s in samples]
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError("sample ids are not unique; resume needs one id per sample")
    if eos_ids is None:
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    todo = [s for s in samples if s.id not in done]
    log(f"{benchmark}: {len(samples)} samples, {len(samples) - len(todo)} already done, {len(todo)} to run")
    torn = pred_path.is_file() and pred_path.stat().st_size > 0 and not pred_path.read_bytes().endswith(b"\n")
    with open(pred_path, "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")  # end the line a crash cut short, so the next record starts on its own line
        for n, sample in enumerate(todo, 1):
            ids = prompt_ids(tokenizer, sample, max_length=max_length, family=family, truncation=truncation)
            start = time.perf_counter()
            new = _strip_eos(generate_fn(ids, sample.max_new_tokens), set(eos_ids))[:sample.max_new_tokens]
            record = {"id": sample.id, "dataset": sample.dataset, "pred": tokenizer.decode(new,
                      skip_special_tokens=True), "answers": sample.answers, "fields": sample.fields,
                      "prompt_tokens": len(ids), "new_tokens": len(new),
                      "seconds": round(time.perf_counter() - start, 3)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            done[sample.id] = record
            log(f"  [{n}/{len(todo)}] {sample.id}: {len(ids)} prompt tokens, {len(new)} new")
    results = score_predictions([done[i] for i in sample_ids], benchmark)
    write_results(results, out_dir, title=benchmark)
    return results


def score_predictions(records, benchmark: str) -> dict:
    """{"benchmark", "datasets": {name: {"score": x100 mean, "n"}}, "average": mean of dataset scores}."""
    per_dataset: dict[str, list[float]] = {}
    for r in records:
        metric, first_line, first_ref = metric_rules(benchmark, r["dataset"])
        s = M.score_sample(metric, r["pred"], r["answers"], first_line=first_line, first_reference_only=first_ref,
                           **r.get("fields", {}))
        per_dataset.setdefault(r["dataset"], []).append(s)
    datasets = {d: {"score": M.mean_score(v), "n": len(v)} for d, v in per_dataset.items()}
    scores = [v["score"] for v in datasets.values()]
    average = round(sum(scores) / len(scores), 2) if scores else float("nan")
    return {"benchmark": benchmark, "datasets": datasets, "average": average}


def results_markdown(results: dict, title: str = "") -> str:
    """A markdown table: one row per dataset (score, n) and the average of the dataset scores."""
    lines = [f"## {title}" if title else "", "", "| dataset | score | n |", "|---|---:|---:|"]
    for name, v in results["datasets"].items():
        lines.append(f"| {name} | {v['score']:.2f} | {v['n']} |")
    avg = results["average"]
    lines.append(f"| **average** | {'nan' if math.isnan(avg) else f'{avg:.2f}'} | |")
    return "\n".join(lines).lstrip("\n") + "\n"


def write_results(results: dict, out_dir, title: str = "", stem: str = "results"):
    """Write <stem>.json and <stem>.md (atomically) into out_dir."""
    out_dir = pathlib.Path(out_dir)
    _atomic_write(out_dir / f"{stem}.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out_dir / f"{stem}.md", results_markdown(results, title))


def greedy_generate_fn(logits_fn=None, *, last_logits_fn=None, eos_ids=(), bucket: int = 64):
    """A plain greedy `generate_fn` over full-sequence logits: the reference decoder (no cache).

    logits_fn(ids [1, T] int32) -> [1, T, V]; or last_logits_fn(ids [1, T] int32, position int) -> [V], the logits
    of one position only (what long contexts need: no [T, V] matrix). Each step recomputes the whole sequence, padded on the right up to a
    multiple of `bucket` so a jitted logits_fn compiles once per bucket (causal attention: padding after the last real
    token does not change its logits). Cost O(T) forwards per token: for tests and short contexts only; real runs use
    ahn_jax.inference.generation with the constant-size cache.
    """
    if (logits_fn is None) == (last_logits_fn is None):
        raise ValueError("greedy_generate_fn needs exactly one of logits_fn and last_logits_fn")
    if last_logits_fn is None:
        def last_logits_fn(ids, position):
            return np.asarray(logits_fn(ids))[0, position]
    eos_ids = set(int(e) for e in eos_ids)

    def generate(prompt_ids, max_new_tokens):
        seq = [int(t) for t in prompt_ids]
        new = []
        for _ in range(max_new_tokens):
            length = len(seq)
            padded = np.zeros((1, -(-length // bucket) * bucket), np.int32)
            padded[0, :length] = seq
            token = int(np.argmax(np.asarray(last_logits_fn(padded, length - 1))))
            new.append(token)
            if token in eos_ids:
                break
            seq.append(token)
        return new

    return generate
