"""Benchmark: Pallas sliding-window + 128 sinks attention, its variants, vs cuDNN sliding-window attention (no sinks).

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/bench_swa_attention.py [--sweep] [--quick]   # GPU
  PYTHONPATH=$PWD python3 benchmarks/bench_swa_attention.py --smoke --sweep                          # CPU dry run

Variants (keyword arguments of pallas_kernels.swa_attention.swa_attention):
  v2       defaults: separate dq kernel (7 backward matmuls), eager rescaling in the forward
  atomic   dq_mode="atomic": dq accumulated inside the dk/dv kernel with float32 atomic adds (5 matmuls)
  lazy     lazy_rescale=True: the forward rescales its accumulator only when a row max grows by > 2**8
  atomic+lazy  both
Order: (1) agreement BEFORE any timing, for every variant: vs a dense float32 reference at T=2048 (W=1024 S=128 and
W=300 S=1000, forward o and the gradients dq, dk, dv), and with sinks=0 vs cuDNN at the full size; (2) optional sweep at
W=4096: dq-kernel tiles (v2), dk/dv tiles (atomic: a longer key tile halves the atomic traffic per score), forward
tiles (lazy); each swept setting is first checked against v2's result at the same inputs; (3) timings at T=32768
Hq16 Hkv2 D128 bf16 for W in 1024, 4096, 8192: forward (once per forward code path) and forward+backward (jax.vjp with
a fixed random cotangent), medians of block_until_ready'd calls after warm-up. JSON to $OUT/bench_swa_attention.json,
the table to stdout and $OUT/bench_swa_attention.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_util import time_jax
from pallas_kernels.swa_attention import swa_attention

START = time.time()
# The Triton kernels' variants (forward/backward "auto" would pick the Mosaic kernels on a Hopper GPU:
# bench_swa_mgpu.py times those).
_TRITON = dict(forward="triton", backward="triton")
VARIANTS = {"v2": _TRITON, "atomic": dict(_TRITON, dq_mode="atomic"), "lazy": dict(_TRITON, lazy_rescale=True),
            "atomic+lazy": dict(_TRITON, dq_mode="atomic", lazy_rescale=True)}
# Which forward code path a variant runs: variants sharing one are timed forward once.
FWD_PATH = {"v2": "eager", "atomic": "eager", "lazy": "lazy", "atomic+lazy": "lazy"}

# Sweeps at W=4096: (variant the tiles apply to, tile keywords).
SWEEP = [
    ("v2", {}), ("atomic", {}), ("lazy", {}),  # each family's default tiles, timed in the same sweep
    ("v2", dict(block_q_dq=128, block_k_dq=64, num_warps_dq=8, num_stages_dq=2)),
    ("v2", dict(block_q_dq=128, block_k_dq=32, num_warps_dq=8, num_stages_dq=2)),
    ("v2", dict(block_q_dq=64, block_k_dq=64, num_warps_dq=4, num_stages_dq=3)),
    ("atomic", dict(block_q_bwd=64, block_k_bwd=128, num_warps_bwd=8, num_stages_bwd=2)),
    ("atomic", dict(block_q_bwd=32, block_k_bwd=128, num_warps_bwd=8, num_stages_bwd=2)),
    ("atomic", dict(block_q_bwd=64, block_k_bwd=128, num_warps_bwd=4, num_stages_bwd=2)),
    ("atomic", dict(block_q_bwd=32, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)),
    ("lazy", dict(block_q=128, block_k=64, num_warps=8, num_stages=3)),
    ("lazy", dict(block_q=128, block_k=128, num_warps=8, num_stages=3)),
    ("lazy", dict(block_q=64, block_k=64, num_warps=4, num_stages=2)),
]


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


class Shape:
    def __init__(self, smoke):
        self.smoke = smoke
        if smoke:  # CPU interpret mode: tiny, the same code paths (sink tail programs included)
            self.b, self.t, self.hq, self.hkv, self.d = 1, 256, 4, 2, 32
            self.sinks, self.windows, self.sweep_window, self.t_ref = 8, (16, 64, 128), 64, 128
            self.ref_cases = ((32, 8), (12, 40))
            self.reps, self.warmup = 2, 1
        else:
            self.b, self.t, self.hq, self.hkv, self.d = 1, 32768, 16, 2, 128
            self.sinks, self.windows, self.sweep_window, self.t_ref = 128, (1024, 4096, 8192), 4096, 2048
            self.ref_cases = ((1024, 128), (300, 1000))
            self.reps, self.warmup = 20, 2


def inputs(shape, t, seed=0, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (shape.b, t, shape.hq, shape.d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (shape.b, t, shape.hkv, shape.d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (shape.b, t, shape.hkv, shape.d), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (shape.b, t, shape.hq, shape.d), jnp.float32).astype(dtype)
    return q, k, v, do


def ours(window, sinks, **kwargs):
    return lambda q, k, v: swa_attention(q, k, v, window=window, sinks=sinks, **kwargs)


def anchor(window, smoke):
    """cuDNN sliding window without sinks (pitfall 8: is_causal with local_window_size=(W-1, 0)); XLA on CPU."""
    impl = "xla" if smoke else "cudnn"
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0),
                                                        implementation=impl)


def dense_scores(q, k, v, window, sinks):
    """Float32 scaled scores [B, Hq, T, T] with the sink + window mask applied (-inf), and v repeated to the q heads."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    t, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    pos_q, pos_k = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (pos_k <= pos_q) & ((pos_q - pos_k < window) | (pos_k < sinks))
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * q.shape[-1] ** -0.5
    return jnp.where(mask, s, -jnp.inf), v


def dense_reference(window, sinks):
    def attn(q, k, v):
        s, v32 = dense_scores(q, k, v, window, sinks)
        p = jax.nn.softmax(s, axis=-1)
        # returned in the input dtype so vjp takes the same cotangent
        return jnp.einsum("bhts,bshd->bthd", p, v32, precision="highest").astype(q.dtype)
    return attn


def fwd_and_vjp(attn):
    fwd = jax.jit(attn)
    both = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
    return fwd, both


def outputs_and_grads(attn, args):
    """o, dq, dk, dv from one compiled call."""
    def f(q, k, v, do):
        o, pull = jax.vjp(attn, q, k, v)
        return (o, *pull(do))
    return jax.jit(f)(*args)


def rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def errors(got, want):
    return {n: rel_err(g, w) for n, g, w in zip(("o", "dq", "dk", "dv"), got, want)}


def ok(errs, tol=2e-2):
    return all(e < tol for e in errs.values())  # NaN compares False: a non-finite result fails


def fmt(errs):
    return " ".join(f"{n}={e:.2e}" for n, e in errs.items()) + (" OK" if ok(errs) else " FAIL")


def check_agreement(shape, variants, full_args):
    """Every variant vs the dense f32 reference (small T) and, with sinks=0, vs the anchor at the full size."""
    report, all_ok = {}, True
    small = inputs(shape, shape.t_ref, seed=1)
    for window, sinks in shape.ref_cases:
        want = outputs_and_grads(dense_reference(window, sinks), small)
        for name, kwargs in variants.items():
            errs = errors(outputs_and_grads(ours(window, sinks, **kwargs), small), want)
            log(f"agreement {name} W={window} S={sinks} vs dense f32 @T={shape.t_ref}: {fmt(errs)}")
            report[f"{name}_ref_w{window}_s{sinks}"] = errs
            all_ok &= ok(errs)
        del want
    window = shape.sweep_window
    want = outputs_and_grads(anchor(window, shape.smoke), full_args)
    for name, kwargs in variants.items():
        errs = errors(outputs_and_grads(ours(window, 0, **kwargs), full_args), want)
        log(f"agreement {name} W={window} S=0 vs anchor @T={shape.t}: {fmt(errs)}")
        report[f"{name}_anchor_w{window}_s0"] = errs
        all_ok &= ok(errs)
    return all_ok, report


def sweep(shape, args, budget_s):
    """Tile settings at the sweep window; returns {variant: best extra kwargs} and the raw results."""
    w, s = shape.sweep_window, shape.sinks
    baseline = outputs_and_grads(ours(w, s, **_TRITON), args)
    results, best = [], {}
    for variant, tiles in SWEEP:
        if time.time() - START > budget_s:
            log(f"sweep: budget {budget_s:.0f}s spent, skipping the rest")
            break
        kwargs = {**VARIANTS[variant], **tiles}
        try:
            errs = errors(outputs_and_grads(ours(w, s, **kwargs), args), baseline)
            if not ok(errs):
                log(f"sweep {variant} {tiles}: disagrees with v2: {fmt(errs)}; skipped")
                continue
            fwd, both = fwd_and_vjp(ours(w, s, **kwargs))
            row = {"variant": variant, "tiles": tiles, "errs_vs_v2": errs,
                   "fwd_ms": time_jax(fwd, *args[:3], reps=10, warmup=shape.warmup),
                   "fwdbwd_ms": time_jax(both, *args, reps=10, warmup=shape.warmup)}
        except Exception as e:  # a tile that does not compile (shared memory, registers) is skipped, and said so
            log(f"sweep {variant} {tiles}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"sweep {variant} {tiles or 'default tiles'}: fwd {row['fwd_ms']:.3f} ms, "
            f"fwd+bwd {row['fwdbwd_ms']:.3f} ms")
        results.append(row)
        key = "fwd_ms" if variant == "lazy" else "fwdbwd_ms"  # forward tiles only change the forward
        if variant not in best or row[key] < best[variant][0]:
            best[variant] = (row[key], tiles)
    # Only tiles that beat their family's default tiles (timed above, same run) are adopted.
    return {variant: tiles for variant, (_, tiles) in best.items() if tiles}, results


TIMING_BUDGET_S = 400  # the lead's GPU call is limited to 8 minutes: windows past this are skipped (W=4096 first)


def time_variants(shape, variants, args):
    rows = []
    order = sorted(shape.windows, key=lambda w: w != shape.sweep_window)  # the sweep window first, then the others
    for w in order:
        if rows and time.time() - START > TIMING_BUDGET_S:
            log(f"W={w}: skipped, {TIMING_BUDGET_S}s budget spent")
            continue
        row = {"window": w}
        fwd_done = {}
        for name, kwargs in variants.items():
            fwd, both = fwd_and_vjp(ours(w, shape.sinks, **kwargs))
            path = FWD_PATH[name]
            if path not in fwd_done:
                fwd_done[path] = time_jax(fwd, *args[:3], reps=shape.reps, warmup=shape.warmup)
            row[name] = {"fwd_ms": fwd_done[path],
                         "fwdbwd_ms": time_jax(both, *args, reps=shape.reps, warmup=shape.warmup)}
        fwd, both = fwd_and_vjp(anchor(w, shape.smoke))
        row["anchor"] = {"fwd_ms": time_jax(fwd, *args[:3], reps=shape.reps, warmup=shape.warmup),
                         "fwdbwd_ms": time_jax(both, *args, reps=shape.reps, warmup=shape.warmup)}
        log(f"W={w}: " + ", ".join(f"{n} {r['fwd_ms']:.3f}/{r['fwdbwd_ms']:.3f}" for n, r in row.items()
                                    if isinstance(r, dict)))
        rows.append(row)
    return sorted(rows, key=lambda r: r["window"])


def table(shape, rows, variants, device, tiles):
    anchor_name = "XLA (smoke)" if shape.smoke else "cuDNN"
    lines = [f"B{shape.b} T{shape.t} Hq{shape.hq} Hkv{shape.hkv} D{shape.d} bf16, ours with {shape.sinks} sinks, "
             f"{anchor_name} without; {device}, jax {jax.__version__}; swept tiles {tiles or 'none'}", ""]
    names = list(variants)
    head = ["W"] + [f"{n} fwd" for n in names] + [f"{anchor_name} fwd"] + [f"{n} fwd+bwd" for n in names] + \
        [f"{anchor_name} fwd+bwd"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a = r["anchor"]
        cells = [str(r["window"])]
        cells += [f"{r[n]['fwd_ms']:.3f} ({r[n]['fwd_ms'] / a['fwd_ms']:.2f}x)" for n in names]
        cells += [f"{a['fwd_ms']:.3f}"]
        cells += [f"{r[n]['fwdbwd_ms']:.3f} ({r[n]['fwdbwd_ms'] / a['fwdbwd_ms']:.2f}x)" for n in names]
        cells += [f"{a['fwdbwd_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    # The best variant by the sum over windows of fwd+bwd time (forward alone for the forward path).
    best_fb = min(names, key=lambda n: sum(r[n]["fwdbwd_ms"] for r in rows))
    best_f = min(names, key=lambda n: sum(r[n]["fwd_ms"] for r in rows))
    lines += ["", f"best fwd+bwd: {best_fb} {variants[best_fb]}; best fwd: {best_f} {variants[best_f]}"]
    return "\n".join(lines), {"best_fwdbwd": best_fb, "best_fwd": best_f}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time a few tile choices per variant at W=4096 first")
    parser.add_argument("--quick", action="store_true", help="time W=4096 only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpret mode: a dry run")
    parser.add_argument("--sweep-budget-s", type=float, default=200.0, help="wall time (from start) to stop sweeping")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    opts = parser.parse_args()
    shape = Shape(opts.smoke)
    if opts.quick:
        shape.windows = (shape.sweep_window,)
    names = [n for n in opts.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    variants = {n: dict(VARIANTS[n]) for n in names}
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.device_kind}, backend {jax.default_backend()}")
    report = {"device": dev.device_kind, "jax": jax.__version__, "smoke": shape.smoke, "sinks": shape.sinks,
              "shape": dict(B=shape.b, T=shape.t, Hq=shape.hq, Hkv=shape.hkv, D=shape.d), "variants": variants}

    args = inputs(shape, shape.t)
    good, report["agreement"] = check_agreement(shape, variants, args)
    if not good:
        log("agreement failed: not timing")
        write(report, None)
        sys.exit(1)

    chosen = {}
    if opts.sweep:
        chosen, report["sweep"] = sweep(shape, args, opts.sweep_budget_s)
        log(f"chosen tiles {chosen}")
        # v2 stays the old baseline. Swept tiles go to the new variants sharing the swept kernel (dk/dv tiles: dq_mode
        # atomic; forward tiles: lazy forward); better dq-kernel tiles become a variant of their own.
        for name, kwargs in variants.items():
            if kwargs.get("dq_mode") == "atomic" and "atomic" in chosen:
                kwargs.update(chosen["atomic"])
            if kwargs.get("lazy_rescale") and "lazy" in chosen:
                kwargs.update(chosen["lazy"])
        if "v2" in chosen and "v2" in variants:
            variants["v2+dq_tiles"] = dict(_TRITON, **chosen["v2"])
            FWD_PATH["v2+dq_tiles"] = "eager"
    report["tiles"] = chosen
    report["timed_variants"] = variants
    report["rows"] = time_variants(shape, variants, args)
    text, best = table(shape, report["rows"], variants, dev.device_kind, chosen)
    report.update(best)
    write(report, text)
    print("\n" + text)


def write(report, text):
    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_swa_attention.json"), "w") as f:
        json.dump(report, f, indent=1)
    if text:
        with open(os.path.join(out, "bench_swa_attention.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
