"""Benchmark: the Mosaic GPU sliding-window + sinks forward (pallas_kernels/swa_attention_mgpu.py) vs the Triton
forward and cuDNN, then forward+backward (Mosaic or Triton forward and backward) vs cuDNN.

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/bench_swa_mgpu.py            # H100 (Hopper only)
  PYTHONPATH=$PWD python3 benchmarks/bench_swa_mgpu.py --smoke                       # CPU: GPU interpreter, tiny

Order: (1) agreement before any timing: every Mosaic variant's o and lse vs a dense float32 reference at T=2048
(several window/sink cases, GQA 8) and vs the Triton forward at the full size; a variant that fails is not timed;
(2) forward at T=32768 Hq16 Hkv2 D128 bf16, 128 sinks, W=4096: every variant (key tile x ring depth x ping-pong
schedule), then the two best and the default at W=1024 and 8192; the Triton forward and cuDNN (no sinks) beside;
(3) forward+backward with jax.vjp: the backward variants (module switches), the Triton path, cuDNN.
JSON to $OUT/bench_swa_mgpu.json, table to stdout and $OUT/bench_swa_mgpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench_swa_attention import anchor, dense_reference, dense_scores, fwd_and_vjp, inputs, rel_err
from bench_util import time_jax
from pallas_kernels import swa_attention_mgpu as mgpu
from pallas_kernels.swa_attention import swa_attention

START = time.time()
TOL = 2e-2  # bf16 operands: relative Frobenius errors land near 2e-3


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


class Shape:
    def __init__(self, smoke):
        if smoke:
            self.b, self.t, self.hq, self.hkv, self.d, self.t_ref = 1, 256, 2, 1, 64, 256
            self.sinks, self.windows, self.main_window = 8, (64, 128), 64
            self.ref_cases = ((64, 8), (20, 100), (1, 0))
            self.reps, self.warmup = 1, 1
            self.variants = [(128, 2, True, 0, 1), (128, 2, True, 2, 1), (128, 2, True, 2, 2)]
            self.bwd_variants = {"mm_pp": dict(forward="mosaic", backward="mosaic", switches=(True, True, True)),
                                 "mm_persistent": dict(forward="mosaic", backward="mosaic", persistent=True),
                                 "mm_fused_dq": dict(forward="mosaic", backward="mosaic", fused=True),
                                 "mm_split3": dict(forward="mosaic", backward="mosaic", split=3)}
        else:
            self.b, self.t, self.hq, self.hkv, self.d, self.t_ref = 1, 32768, 16, 2, 128, 2048
            self.sinks, self.windows, self.main_window = 128, (1024, 4096, 8192), 4096
            self.ref_cases = ((1024, 128), (300, 1000), (64, 0), (4096, 0), (1, 0))
            self.reps, self.warmup = 20, 2
            # (block_kv, ring depth, ping-pong, persistent CTAs or 0, Q buffers); 128 x 4 stages would need 256 KB
            # of K/V slots: over the 227 KB. (128, 2, ping-pong) was the first run's best (RESULTS.md). Q buffers 2:
            # the persistent grid loads the next tile's Q during this one (MgpuConfig.q_buffers).
            sm = mgpu.sm_count()
            self.variants = [(128, 2, True, 0, 1), (128, 2, True, sm, 1), (128, 2, True, sm, 2)]
            mm = dict(forward="mosaic", backward="mosaic")
            # Earlier runs (RESULTS.md): dq key tile 64 / 128 and rings 2 / 3 within 4 %, ping-pong 2-5 % slower,
            # paired dv/dk accumulations and 3-slot rings faster (now the defaults). switches = (ping-pong dq,
            # ping-pong dk/dv, paired accumulations); None keeps the module's defaults.
            # persistent forward: "auto" = for windows <= swa_attention_mgpu.PERSISTENT_MAX_WINDOW
            # fused: dq accumulated by the dk/dv kernel (TMA reduce-adds) vs its own kernel (BWD_FUSED_DQ)
            # registers: the dk/dv kernel's compute warpgroups' (BWD_DKV_REGISTERS). Run 4 of the fifth round timed
            # fused / dq kernel x 232 / 240 registers; the defaults are the dq kernel and 240.
            # split: CTAs per key block of the dk/dv kernel (BWD_DKV_SPLIT; sixth round in RESULTS.md timed 1-4; the
            # default "auto" picks per window, split1 is the kernel before it).
            self.bwd_variants = {"mm_defaults": mm, "mm_split1": dict(mm, split=1)}


def mosaic_forward(window, sinks, block_kv, stages, schedule, persistent_ctas, q_buffers, interpret):
    def run(q, k, v):
        scale = q.shape[-1] ** -0.5
        cfg = mgpu.MgpuConfig(window=window, sinks=sinks, scale=scale, block_kv=block_kv, stages=stages,
                              schedule_barrier=schedule, persistent_ctas=persistent_ctas, q_buffers=q_buffers,
                              interpret=interpret)
        tp = -(-q.shape[1] // max(mgpu.ROWS_PER_CTA, block_kv)) * max(mgpu.ROWS_PER_CTA, block_kv)
        pad = ((0, 0), (0, tp - q.shape[1]), (0, 0), (0, 0))
        o, lse = mgpu.forward(*(jnp.pad(x, pad) for x in (q, k, v)), cfg)
        return o[:, : q.shape[1]], lse[:, :, : q.shape[1]]
    return jax.jit(run)


def dense_with_lse(window, sinks):
    def run(q, k, v):
        s, _ = dense_scores(q, k, v, window, sinks)
        return dense_reference(window, sinks)(q, k, v), jax.nn.logsumexp(s, axis=-1)
    return jax.jit(run)


def library_forward(window, sinks, interpret):
    """What users get: swa_attention's Mosaic forward with the module's defaults (persistent grid, Q buffers)."""
    def run(q, k, v):
        o, lse = swa_attention(q, k, v, window=window, sinks=sinks, return_lse=True, forward="mosaic",
                               backward="mosaic", interpret=interpret)
        return o, jnp.swapaxes(lse, 1, 2)
    return jax.jit(run)


def triton_forward(window, sinks, interpret):
    def run(q, k, v):
        o, lse = swa_attention(q, k, v, window=window, sinks=sinks, return_lse=True, forward="triton",
                               backward="triton", interpret=interpret)
        return o, jnp.swapaxes(lse, 1, 2)  # [B, Hq, T] like the Mosaic kernel's
    return jax.jit(run)


def errs(got, want):
    o_err = rel_err(got[0], want[0])
    lse = np.asarray(got[1], np.float32)
    lse_err = float(np.max(np.abs(lse - np.asarray(want[1], np.float32)))) if np.all(np.isfinite(lse)) else np.nan
    return {"o": o_err, "lse_maxabs": lse_err}


def good(e):
    return e["o"] < TOL and e["lse_maxabs"] < 5e-2  # NaN compares False


def name(v):
    bk, stages, schedule, persistent, q_buffers = v
    return (f"bk{bk}_s{stages}_{'pp' if schedule else 'nopp'}" + (f"_persistent{persistent}" if persistent else "")
            + (f"_q{q_buffers}" if q_buffers > 1 else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the GPU interpreter")
    parser.add_argument("--windows", default="", help="comma-separated windows to time instead of the defaults")
    parser.add_argument("--forward-repeat", type=int, default=0,
                        help="only the forward variants: agreement, then N interleaved timings per window vs cuDNN")
    parser.add_argument("--repeat", type=int, default=1,
                        help="then time ours and cuDNN N more times per window, interleaved: spread and median ratio")
    parser.add_argument("--backward-repeat", type=int, default=0,
                        help="after the backward agreement: every agreeing backward variant's fwd+bwd and cuDNN's, N "
                             "interleaved timings per window, then stop")
    opts = parser.parse_args()
    shape = Shape(opts.smoke)
    if opts.windows:
        shape.windows = tuple(int(w) for w in opts.windows.split(","))
    interpret = opts.smoke
    dev = jax.devices()[0]
    out = os.environ.get("OUT", "/tmp" if opts.smoke else ".")
    log(f"jax {jax.__version__}, device {dev.device_kind}")
    report = {"device": dev.device_kind, "jax": jax.__version__, "rows": {}, "agreement": {}, "failures": {}}
    try:
        from jax._src.lib import cuda_versions
        report["cuda_runtime"] = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    except Exception as e:  # noqa: BLE001 - only informative
        report["cuda_runtime"] = repr(e)
    log(f"cuda runtime {report['cuda_runtime']}")

    # (1) agreement
    small = inputs(shape, shape.t_ref, seed=1)[:3]
    full = inputs(shape, shape.t, seed=0)[:3]
    passing = []
    tri_full = triton_forward(shape.main_window, shape.sinks, interpret)(*full)
    for v in shape.variants:
        ok = True
        try:
            for window, sinks in shape.ref_cases:
                e = errs(mosaic_forward(window, sinks, *v, interpret)(*small), dense_with_lse(window, sinks)(*small))
                report["agreement"][f"{name(v)}_w{window}_s{sinks}"] = e
                ok &= good(e)
            e = errs(mosaic_forward(shape.main_window, shape.sinks, *v, interpret)(*full), tri_full)
            report["agreement"][f"{name(v)}_vs_triton_full"] = e
            ok &= good(e)
        except Exception as ex:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            report["failures"][name(v)] = traceback.format_exc()[-3000:]
            log(f"{name(v)}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
            continue
        worst = {k: e for k, e in report["agreement"].items() if k.startswith(name(v) + "_")}
        log(f"{name(v)} agreement: " + ("OK" if ok else "FAIL") + " worst o "
            f"{max(x['o'] for x in worst.values()):.2e}, lse {max(x['lse_maxabs'] for x in worst.values()):.2e}")
        if ok:
            passing.append(v)
    lib = {f"library_default_w{window}_s{sinks}": errs(library_forward(window, sinks, interpret)(*small),
                                                       dense_with_lse(window, sinks)(*small))
           for window, sinks in shape.ref_cases}
    lib["library_default_vs_triton_full"] = errs(library_forward(shape.main_window, shape.sinks, interpret)(*full),
                                                 tri_full)
    report["agreement"].update(lib)
    log("library default forward agreement: " + ("OK" if all(map(good, lib.values())) else "FAIL"))
    if not passing or not all(map(good, lib.values())):
        log("no Mosaic variant or not the library's default forward agrees: not timing")
        write(out, report, None)
        raise SystemExit(1)

    if opts.forward_repeat:  # forward variants only: interleaved repeated timings against cuDNN, then stop
        text = forward_repeat(opts.forward_repeat, shape, passing, full, interpret, report)
        write(out, report, text)
        print("\n" + text)
        return

    # (2) backward agreement: gradients of every backward variant vs dense float32 (small T) and vs the Triton
    # path at the full size
    from bench_swa_attention import errors, fmt, ok, outputs_and_grads
    from bench_swa_attention import ours as ours_plain

    def ours(window, sinks, switches=None, persistent=None, fused=None, registers=None, split=None, **kwargs):
        """swa_attention with the Mosaic kernels' module switches set (read when swa_attention builds its config)."""
        def attn(q, k, v):
            saved = (mgpu.BWD_SCHEDULE_DQ, mgpu.BWD_SCHEDULE_DKV, mgpu.BWD_PAIRED_DKV, mgpu.FORWARD_PERSISTENT,
                     mgpu.BWD_FUSED_DQ, mgpu.BWD_DKV_REGISTERS, mgpu.BWD_DKV_SPLIT)
            if switches is not None:
                mgpu.BWD_SCHEDULE_DQ, mgpu.BWD_SCHEDULE_DKV, mgpu.BWD_PAIRED_DKV = switches
            if persistent is not None:
                mgpu.FORWARD_PERSISTENT = persistent
            if fused is not None:
                mgpu.BWD_FUSED_DQ = fused
            if registers is not None:
                mgpu.BWD_DKV_REGISTERS = registers
            if split is not None:
                mgpu.BWD_DKV_SPLIT = split
            try:
                return ours_plain(window, sinks, **kwargs)(q, k, v)
            finally:
                (mgpu.BWD_SCHEDULE_DQ, mgpu.BWD_SCHEDULE_DKV, mgpu.BWD_PAIRED_DKV, mgpu.FORWARD_PERSISTENT,
                 mgpu.BWD_FUSED_DQ, mgpu.BWD_DKV_REGISTERS, mgpu.BWD_DKV_SPLIT) = saved
        return attn

    grads_ok = {}
    small4 = inputs(shape, shape.t_ref, seed=1)
    full4 = inputs(shape, shape.t, seed=0)
    triton = dict(forward="triton", backward="triton")
    tri_grads = outputs_and_grads(ours(shape.main_window, shape.sinks, interpret=interpret, **triton), full4)
    for bname, kwargs in shape.bwd_variants.items():
        try:
            good_all = True
            for window, sinks in shape.ref_cases[:2]:
                e = errors(outputs_and_grads(ours(window, sinks, interpret=interpret, **kwargs), small4),
                           outputs_and_grads(dense_reference(window, sinks), small4))
                report["agreement"][f"{bname}_grads_w{window}_s{sinks}"] = e
                log(f"{bname} W={window} S={sinks} vs dense f32: {fmt(e)}")
                good_all &= ok(e)
            e = errors(outputs_and_grads(ours(shape.main_window, shape.sinks, interpret=interpret, **kwargs), full4),
                       tri_grads)
            report["agreement"][f"{bname}_grads_vs_triton_full"] = e
            log(f"{bname} vs Triton at full size: {fmt(e)}")
            grads_ok[bname] = good_all and ok(e)
        except Exception as ex:  # noqa: BLE001
            report["failures"][bname] = traceback.format_exc()[-3000:]
            log(f"{bname}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
    del tri_grads
    if opts.backward_repeat:  # agreeing backward variants: interleaved repeated fwd+bwd timings vs cuDNN, then stop
        text = backward_repeat(opts.backward_repeat, shape, {k: v for k, v in shape.bwd_variants.items()
                                                             if grads_ok.get(k)}, full4, interpret, report, ours)
        write(out, report, text)
        print("\n" + text)
        return

    # (3) timings: W=main first (every forward and backward variant), then the others (defaults and the best)
    def time_fwd(fn):
        return time_jax(fn, *full, reps=shape.reps, warmup=shape.warmup)

    def time_fb(window, kwargs):
        _, both = fwd_and_vjp(ours(window, shape.sinks, interpret=interpret, **kwargs))
        return time_jax(both, *full4, reps=shape.reps, warmup=shape.warmup)

    w = shape.main_window
    fwd = {name(v): time_fwd(mosaic_forward(w, shape.sinks, *v, interpret)) for v in passing}
    for k_, t in sorted(fwd.items(), key=lambda kv: kv[1]):
        log(f"W={w} fwd {k_}: {t:.3f} ms")
    fb = {}
    for bname, kwargs in shape.bwd_variants.items():
        if grads_ok.get(bname):
            fb[bname] = time_fb(w, kwargs)
            log(f"W={w} fwd+bwd {bname}: {fb[bname]:.3f} ms")
    best_bwd = min(fb, key=fb.get) if fb else None
    # The table's "mosaic_fwd" is the library's default forward (not the fastest variant of one noisy pass).
    for window in shape.windows:
        row = {"triton_fwd": time_fwd(triton_forward(window, shape.sinks, interpret)),
               "cudnn_fwd": time_fwd(jax.jit(anchor(window, opts.smoke))),
               "mosaic_fwd": time_fwd(library_forward(window, shape.sinks, interpret))}
        if best_bwd:
            row["mosaic_fwdbwd"] = fb[best_bwd] if window == w else time_fb(window, shape.bwd_variants[best_bwd])
        row["mosaic_fwd_triton_bwd"] = time_fb(window, dict(forward="mosaic", backward="triton"))
        row["triton_fwdbwd"] = time_fb(window, triton)
        _, both = fwd_and_vjp(anchor(window, opts.smoke))
        row["cudnn_fwdbwd"] = time_jax(both, *full4, reps=shape.reps, warmup=shape.warmup)
        report["rows"][window] = row
        log(f"W={window}: " + ", ".join(f"{k_} {t:.3f}" for k_, t in row.items()))
    report["fwd_w_main"], report["fwdbwd_w_main"], report["best_bwd"] = fwd, fb, best_bwd

    lines = [f"B{shape.b} T{shape.t} Hq{shape.hq} Hkv{shape.hkv} D{shape.d} bf16, {shape.sinks} sinks (cuDNN none); "
             f"{dev.device_kind}, jax {jax.__version__}", "",
             f"forward at W={w} (ms): " + ranked(fwd),
             f"fwd+bwd at W={w} (ms): " + ranked(fb),
             f"mosaic_fwd below = the library default; mosaic_fwdbwd below = {best_bwd}: "
             f"{shape.bwd_variants.get(best_bwd)}", ""]
    cols = ["mosaic_fwd", "triton_fwd", "cudnn_fwd", "mosaic_fwdbwd", "mosaic_fwd_triton_bwd", "triton_fwdbwd",
            "cudnn_fwdbwd"]
    lines += ["| W | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for window, row in report["rows"].items():
        cells = []
        for c_ in cols:
            if c_ not in row:
                cells.append("-")
                continue
            base = row["cudnn_fwd" if c_.endswith("_fwd") else "cudnn_fwdbwd"]
            cells.append(f"{row[c_]:.3f}" + ("" if c_.startswith("cudnn") else f" ({row[c_] / base:.2f}x)"))
        lines.append(f"| {window} | " + " | ".join(cells) + " |")
    if opts.repeat > 1 and best_bwd:
        lines += ["", repeat_ratios(opts.repeat, shape, report, full, full4, interpret,
                                    shape.bwd_variants[best_bwd], ours)]
    text = "\n".join(lines)
    write(out, report, text)
    print("\n" + text)


def repeat_ratios(n, shape, report, full, full4, interpret, bwd_kwargs, ours):
    """Ours / cuDNN, forward and forward+backward, timed n times per window, interleaved (each rep visits every
    window), with the compiled functions kept: the run-to-run spread of the ratios, and their medians."""
    fns = {}
    for window in shape.windows:
        fns[window] = {
            "mosaic_fwd": (library_forward(window, shape.sinks, interpret), full),
            "cudnn_fwd": (jax.jit(anchor(window, interpret)), full),
            "mosaic_fwdbwd": (fwd_and_vjp(ours(window, shape.sinks, interpret=interpret, **bwd_kwargs))[1], full4),
            "cudnn_fwdbwd": (fwd_and_vjp(anchor(window, interpret))[1], full4),
        }
    ratios = {w: {"fwd": [], "fwdbwd": []} for w in shape.windows}
    for rep in range(n):
        for window, f in fns.items():
            t = {k: time_jax(fn, *args, reps=shape.reps, warmup=shape.warmup) for k, (fn, args) in f.items()}
            ratios[window]["fwd"].append(t["mosaic_fwd"] / t["cudnn_fwd"])
            ratios[window]["fwdbwd"].append(t["mosaic_fwdbwd"] / t["cudnn_fwdbwd"])
            log(f"repeat {rep}: W={window} " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    report["repeat_ratios"] = ratios
    rows = [f"ours / cuDNN over {n} interleaved repetitions (min / median / max):", "",
            "| W | fwd | fwd+bwd |", "|---|---|---|"]
    for window, r in ratios.items():
        cells = [f"{min(x):.3f} / {float(np.median(x)):.3f} / {max(x):.3f}" for x in (r["fwd"], r["fwdbwd"])]
        rows.append(f"| {window} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def backward_repeat(n, shape, variants, full4, interpret, report, ours):
    """Every agreeing backward variant's forward+backward and cuDNN's, per window, timed n times interleaved: the
    ratio's min / median / max (as forward_repeat does for the forward variants)."""
    fns = {w: {**{k: fwd_and_vjp(ours(w, shape.sinks, interpret=interpret, **kw))[1] for k, kw in variants.items()},
               "cudnn": fwd_and_vjp(anchor(w, interpret))[1]} for w in shape.windows}
    return interleaved_ratios("forward+backward", n, fns, full4, shape.reps, shape.warmup, report)


def forward_repeat(n, shape, passing, full, interpret, report):
    """Every agreeing forward variant and cuDNN, per window, timed n times interleaved (50 calls per timing): the
    ratio's min / median / max, for differences smaller than one pass's noise (e.g. the persistent grid)."""
    fns = {w: {**{name(v): mosaic_forward(w, shape.sinks, *v, interpret) for v in passing},
               "library_default": library_forward(w, shape.sinks, interpret),
               "cudnn": jax.jit(anchor(w, interpret))} for w in shape.windows}
    return interleaved_ratios("forward", n, fns, full, max(shape.reps, 50), shape.warmup, report)


def interleaved_ratios(what, n, fns, args, reps, warmup, report):
    """fns: {window: {variant: fn, ..., "cudnn": fn}}. Each repetition times every window's functions in turn; the
    ratios to cuDNN go to report[f"{what}_repeat_ratios"] and a min / median / max table is returned."""
    ratios = {w: {k: [] for k in f if k != "cudnn"} for w, f in fns.items()}
    for rep in range(n):
        for w, f in fns.items():
            t = {k: time_jax(fn, *args, reps=reps, warmup=warmup) for k, fn in f.items()}
            for k in ratios[w]:
                ratios[w][k].append(t[k] / t["cudnn"])
            log(f"{what} repeat {rep}: W={w} " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    report[f"{what}_repeat_ratios"] = ratios
    names = list(next(iter(ratios.values())))
    rows = [f"{what}, ours / cuDNN over {n} interleaved repetitions (min / median / max):", "",
            "| W | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for w, r in ratios.items():
        rows.append(f"| {w} | " + " | ".join(f"{min(r[k]):.3f} / {float(np.median(r[k])):.3f} / {max(r[k]):.3f}"
                                              for k in names) + " |")
    return "\n".join(rows)


def ranked(times):
    return ", ".join(f"{k} {t:.3f}" for k, t in sorted(times.items(), key=lambda kv: kv[1]))


def write(out, report, text):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_swa_mgpu.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    if text:
        with open(os.path.join(out, "bench_swa_mgpu.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
