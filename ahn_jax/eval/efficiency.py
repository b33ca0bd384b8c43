"""Efficiency report: analytic FLOPs and cache bytes against context length (ahn_jax.eval.flops), and, on a GPU/TPU,
measured peak device memory and throughput of any callable.

The analytic part runs anywhere. The measured part uses `device.memory_stats()` ("peak_bytes_in_use"), which the CPU
backend does not provide: there the memory fields are None, and timings are reported but mean little.
"""

from __future__ import annotations

import time

import jax

from ahn_jax.eval import flops as F


def analytic_report(shape: F.ModelShape, lengths, *, window: int, sinks: int = 0, variants=F.VARIANTS,
                    bytes_per_element: int = 4, allmem: F.AllMemShape = F.AllMemShape()) -> dict:
    """{"window", "sinks", "bytes_per_element", "lengths", "variants": {v: {"mixing_flops": [..], "model_flops": [..],
    "cache_bytes": [..], "model_flops_ratio": [vs full], "cache_ratio": [vs full]}}} over `lengths`."""
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive context lengths, got {lengths}")
    tables = [F.cost_table(shape, n, window=window, sinks=sinks, bytes_per_element=bytes_per_element,
                           variants=tuple(dict.fromkeys(("full",) + tuple(variants))), allmem=allmem)
              for n in lengths]
    out = {"window": window, "sinks": sinks, "bytes_per_element": bytes_per_element, "lengths": lengths,
           "variants": {}}
    for v in variants:
        entry = {k: [t[v][k] for t in tables] for k in ("mixing_flops", "model_flops", "cache_bytes")}
        entry["model_flops_ratio"] = [t[v]["model_flops"] / t["full"]["model_flops"] for t in tables]
        entry["cache_ratio"] = [t[v]["cache_bytes"] / t["full"]["cache_bytes"] for t in tables]
        out["variants"][v] = entry
    return out


def _peak_bytes(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def measure(fn, *args, repeats: int = 3, tokens: int | None = None) -> dict:
    """Time `fn(*args)` (one warm-up call that also compiles, then `repeats` timed calls, each blocked until ready).

    Returns {"seconds_first", "seconds_median", "tokens_per_second" (if tokens given), "peak_bytes" (None on CPU),
    "backend"}. peak_bytes is the device's peak since process start, so measure the largest case last or in its own
    process.
    """
    device = jax.devices()[0]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2] if times else first
    out = {"seconds_first": first, "seconds_median": median, "peak_bytes": _peak_bytes(device),
           "backend": jax.default_backend()}
    if tokens:
        out["tokens_per_second"] = tokens / median
    return out


def measured_report(make_fn, lengths, *, repeats: int = 3, log=print) -> dict:
    """make_fn(length) -> (fn, args) for one variant; returns {"lengths", "runs": [measure(...) per length]}."""
    runs = []
    for n in lengths:
        fn, args = make_fn(int(n))
        runs.append(measure(fn, *args, repeats=repeats, tokens=int(n)))
        log(f"  length {n}: {runs[-1]['seconds_median']:.4f} s, peak {runs[-1]['peak_bytes']}")
    return {"lengths": [int(n) for n in lengths], "runs": runs}


def efficiency_markdown(report: dict) -> str:
    """Markdown table of the analytic report: model TFLOPs and cache GB (1e9 bytes) per variant and length."""
    lengths = report["lengths"]
    header = "| variant | " + " | ".join(f"{n} tok: TFLOPs / cache GB" for n in lengths) + " |"
    lines = [f"window {report['window']}, sinks {report['sinks']}, {report['bytes_per_element']} bytes/element", "",
             header, "|---|" + "---:|" * len(lengths)]
    for v, e in report["variants"].items():
        cells = [f"{f / 1e12:.3g} / {c / 1e9:.3g}" for f, c in zip(e["model_flops"], e["cache_bytes"])]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
