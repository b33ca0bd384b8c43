"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed; imported lazily)."""

from __future__ import annotations

import math
import os
import pathlib


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    """Write the PNG to a temporary name, then rename (no half-written figure on a crash)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_ppl_by_position(result: dict, path, title: str = "Perplexity by position"):
    """Line plot of perplexity per position bucket for each variant (result of perplexity_by_position)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    centres = [s + result["bucket_size"] / 2 for s in result["bucket_starts"]]
    for name, v in result["variants"].items():
        points = [(x, y) for x, y in zip(centres, v["ppl"]) if not math.isnan(y)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                label=f"{name} (overall {v['overall_ppl']:.2f})")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_efficiency(report: dict, path, measured: dict | None = None, title: str = "Cost against context length"):
    """Model FLOPs and cache bytes against context length per variant (analytic_report); measured throughput and
    peak memory in a third panel when `measured` ({variant: measured_report}) is given."""
    plt = _pyplot()
    panels = 3 if measured else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    lengths = report["lengths"]
    for name, e in report["variants"].items():
        axes[0].plot(lengths, [f / 1e12 for f in e["model_flops"]], marker="o", label=name)
        axes[1].plot(lengths, [c / 1e9 for c in e["cache_bytes"]], marker="o", label=name)
    axes[0].set_ylabel("model TFLOPs (forward)")
    axes[1].set_ylabel(f"cache GB ({report['bytes_per_element']} bytes/element)")
    if measured:
        for name, m in measured.items():
            axes[2].plot(m["lengths"], [r.get("tokens_per_second") for r in m["runs"]], marker="o", label=name)
        axes[2].set_ylabel("measured tokens / s")
    for ax in axes:
        ax.set_xlabel("context length (tokens)")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} (window {report['window']}, sinks {report['sinks']})")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
