"""Summarise a jax.profiler perfetto trace (perfetto_trace.json.gz) into a few numbers that fit in a JSON report:
per process and thread (a GPU stream is one), the event (kernel) count, their summed time, the wall span and the busy fraction, and the kernels
that take the most time (grouped by name). A full trace of a 36-layer decode step is too large to bring back from the
GPU machine; this is what we want to know from it: is the step launch-bound (many short kernels, busy << span) or
bound by a few kernels, and which ones.

    with jax.profiler.trace(tmp, create_perfetto_trace=True): ...
    summary = summarize_dir(tmp, steps=5)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re


def find_trace(log_dir):
    files = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir} (trace with create_perfetto_trace=True)")
    return files[-1]


def _short(name, width=90):
    # Fusion names carry numeric suffixes (fusion.123, loop_add_fusion_4): group them by their stem.
    name = re.sub(r"[._]\d+$", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def _busy(intervals):
    """Length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0.0 if cur_e is None else cur_e - cur_s)


def summarize(events, *, steps=1, top=25):
    """events: the trace's "traceEvents" list. -> {"process | thread": {events_per_step, event_ms_per_step (nested events
    count twice: on a GPU stream they do not nest),
    busy_ms_per_step, span_ms_per_step, busy_fraction, top: [[name, count per step, ms per step], ...] grouped by name
    stem, top_kernels: the same by exact name (look them up in the module's HLO), event_args: arg keys}} for every
    process that is not the host's Python/runtime threads (names starting with '/device:')."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    # Per (process, thread): a GPU process has one thread per stream (the kernels) and others ("XLA Ops",
    # "XLA Modules") whose events span those kernels; adding them up would count the same time twice.
    per = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            per[(e["pid"], e.get("tid"))].append(e)
    out = {}
    for (pid, tid), evs in per.items():
        intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs]
        span = max(b for _, b in intervals) - min(a for a, _ in intervals)
        by_name = collections.defaultdict(lambda: [0, 0.0])
        by_kernel = collections.defaultdict(lambda: [0, 0.0])  # exact names: one fusion of the HLO module each
        for e in evs:
            for table, key in ((by_name, _short(e.get("name", "?"))), (by_kernel, e.get("name", "?"))):
                table[key][0] += 1
                table[key][1] += float(e["dur"])
        busy = _busy(intervals)
        out[f"{names.get(pid, pid)} | {threads.get((pid, tid), tid)}"] = {
            "events_per_step": len(evs) / steps,
            "event_ms_per_step": sum(float(e["dur"]) for e in evs) / 1e3 / steps,
            "busy_ms_per_step": busy / 1e3 / steps,
            "span_ms_per_step": span / 1e3 / steps,
            "busy_fraction": busy / span if span else None,
            "top": [[n, c / steps, round(t / 1e3 / steps, 4)]
                    for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]],
            "top_kernels": [[n, c / steps, round(t / 1e3 / steps, 4)]
                            for n, (c, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:2 * top]],
            "event_args": sorted(evs[0].get("args", {}))[:20],
        }
    return out


def summarize_dir(log_dir, *, steps=1, top=25):
    with gzip.open(find_trace(log_dir), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return summarize(events, steps=steps, top=top)
