"""Benchmark: the Pallas Mamba2 SSD kernel (ahn_jax.ops.ssd impl="pallas") vs the XLA chunk form (impl="chunk") of
the same op, and flash-linear-attention's chunk_simple_gla when fla is importable, one process, one GPU.

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/bench_ssd.py            # GPU
  PYTHONPATH=$PWD python3 benchmarks/bench_ssd.py --smoke                        # CPU dry run (interpret mode)

Order per shape: (1) agreement BEFORE timing: float32 inputs, ours vs XLA chunk, relative error (Frobenius) of y, the
final state and the gradients of sum(y * cot) + sum(state * cot_s) in x, dt, A, B, C, dt_bias; (2) timings with bf16
x, B, C (float32 dt, A, dt_bias, state): forward (y and final state) and forward+backward, medians of several reps
after warm-up with block_until_ready. Shapes are the AHN-Mamba2 memory's at 3B (Qwen2.5-3B: 16 query heads, one B/C
group per head, P = N = head_dim 128; dt_softplus with dt_bias, chunk_size 256 for the XLA form), plus P = 64.
FLA has no Mamba2 kernel of its own; its chunk_simple_gla is the same scan (q = C, k = B, v = d x, g = d A, scale 1),
timed with d = softplus(dt + dt_bias) and d x computed in torch inside the timed call.
JSON to $OUT/bench_ssd.json and the table to stdout and $OUT/bench_ssd.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ahn_jax.ops import mamba_ssd as ssd_op
from pallas_kernels import ssd as pk
from bench_util import rel, time_jax

START = time.time()
SHAPES = [("B1 T32768 H16 P128 N128", 1, 32768, 16, 128, 128), ("B1 T32768 H16 P64 N128", 1, 32768, 16, 64, 128),
          ("B8 T4096 H16 P128 N128", 8, 4096, 16, 128, 128)]
ROWS = []
BUDGET_S = 420  # the lead's GPU call is limited to 8 minutes: later shapes are skipped past this


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


def out_dir():
    d = os.environ.get("OUT", ".")
    os.makedirs(d, exist_ok=True)
    return d


def save():
    with open(os.path.join(out_dir(), "bench_ssd.json"), "w") as f:
        json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "kernel_chunk": pk.KERNEL_CHUNK,
                   "block_p": pk.DEFAULT_BLOCK_P, "rows": ROWS}, f, indent=1)


def make_inputs(b, t, h, p, n, seed=0):
    """Host float32 arrays shared by jax and torch: B, C L2-normalised (as the memory feeds them), raw dt ~ N(0,1) - 1,
    A = -(1..H) and dt_bias = 1 (the memory's init)."""
    rng = np.random.default_rng(seed)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    return dict(x=rng.standard_normal((b, t, h, p), dtype=np.float32),
                dt=(rng.standard_normal((b, t, h)) - 1.0).astype(np.float32),
                A=-np.arange(1, h + 1, dtype=np.float32),
                B=unit(rng.standard_normal((b, t, h, n), dtype=np.float32)),
                C=unit(rng.standard_normal((b, t, h, n), dtype=np.float32)),
                dt_bias=np.ones((h,), np.float32),
                cot=rng.standard_normal((b, t, h, p), dtype=np.float32),
                cot_s=rng.standard_normal((b, h, p, n), dtype=np.float32))


def timing_inputs(inp):
    """The timed calls' operands: (x, dt, A, B, C, dt_bias) with x, B, C in bf16, and the cotangents (cot, cot_s)."""
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    args = [bf(inp["x"]), jnp.asarray(inp["dt"]), jnp.asarray(inp["A"]), bf(inp["B"]), bf(inp["C"]),
            jnp.asarray(inp["dt_bias"])]
    return args, [jnp.asarray(inp["cot"]), jnp.asarray(inp["cot_s"])]


def op_fns(impl):
    """(forward, forward+backward) of ops.ssd with this impl, jitted."""
    def fwd(x, dt, A, B, C, dt_bias):
        return ssd_op.ssd(x, dt, A, B, C, chunk_size=256, dt_bias=dt_bias, dt_softplus=True,
                          return_final_states=True, impl=impl)

    def loss(x, dt, A, B, C, dt_bias, cot, cot_s):
        y, s = fwd(x, dt, A, B, C, dt_bias)
        return jnp.sum(y.astype(jnp.float32) * cot) + jnp.sum(s * cot_s), (y, s)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))


def agreement(inp, row):
    """Ours vs the XLA chunk form, float32 inputs: y, final state and every gradient (before any timing)."""
    args = [jnp.asarray(inp[k]) for k in ("x", "dt", "A", "B", "C", "dt_bias", "cot", "cot_s")]
    grads, (y, s) = op_fns("pallas")[1](*args)
    grads_ref, (y_ref, s_ref) = op_fns("chunk")[1](*args)
    row["rel_err_y"], row["rel_err_state"] = rel(y, y_ref), rel(s, s_ref)
    for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "dt_bias"), grads, grads_ref):
        row[f"rel_err_d{name}"] = rel(g, g_ref)
    worst = max(v for k, v in row.items() if k.startswith("rel_err_"))
    row["agree"] = bool(np.isfinite(worst) and worst < 2e-2)  # TF32-level dots on GPU; interpret mode is ~1e-6
    log(f"{row['shape']}: agreement (f32, vs XLA chunk)", {k: f"{v:.1e}" for k, v in row.items() if "rel_err" in k})


def bench_shape(name, b, t, h, p, n, reps, with_fla):
    row = {"kind": "bench", "shape": name}
    inp = make_inputs(b, t, h, p, n)
    agreement(inp, row)
    args, cots = timing_inputs(inp)
    for impl, key in (("pallas", "ours"), ("chunk", "xla")):
        try:
            fwd, fb = op_fns(impl)
            row[f"{key}_fwd_ms"] = time_jax(fwd, *args, reps=reps)
            row[f"{key}_fwdbwd_ms"] = time_jax(fb, *args, *cots, reps=reps)
        except Exception as e:  # noqa: BLE001 - keep the other numbers
            row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"{name}: {key}", {k: row[k] for k in row if k.startswith(key)})
    if with_fla:
        fla_times(inp, row)
    ROWS.append(row)
    save()


def fla_times(inp, row):
    """flash-linear-attention's chunk_simple_gla on the same inputs (bf16), agreement with our y, then timings."""
    try:
        import torch
        import triton
        from fla.ops.simple_gla import chunk_simple_gla

        dev = "cuda"
        tb = {k: torch.from_numpy(inp[k]).to(dev) for k in ("x", "B", "C", "cot")}
        x, bm, cm = (tb[k].to(torch.bfloat16) for k in ("x", "B", "C"))
        dt, A, dt_bias = (torch.from_numpy(inp[k]).to(dev) for k in ("dt", "A", "dt_bias"))

        def run(x, dt, bm, cm):
            d = torch.nn.functional.softplus(dt + dt_bias)
            o, _ = chunk_simple_gla(q=cm, k=bm, v=(x * d[..., None]).to(x.dtype), g=d * A, scale=1.0,
                                    output_final_state=True)
            return o

        y_fla = run(x, dt, bm, cm).float().cpu().numpy()
        y_ours = op_fns("pallas")[0](*[jnp.asarray(inp[k]) for k in ("x", "dt", "A", "B", "C", "dt_bias")])[0]
        row["fla_rel_err_y_vs_ours_f32"] = rel(y_fla, y_ours)
        row["fla_fwd_ms"] = triton.testing.do_bench(lambda: run(x, dt, bm, cm), return_mode="median")
        leaves = [a.clone().requires_grad_(True) for a in (x, dt, bm, cm)]

        def fwd_bwd():
            run(*leaves).backward(tb["cot"].to(torch.bfloat16))

        row["fla_fwdbwd_ms"] = triton.testing.do_bench(fwd_bwd, return_mode="median")
        tb.clear()  # free the tensors before empty_cache (clear, not del: fwd_bwd closes over both)
        leaves.clear()
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - FLA is optional (carried on the GPU machine only)
        row["fla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"{row['shape']}: fla", {k: row[k] for k in row if k.startswith("fla")})


def sweep(shape, reps, budget_s=None):
    """Forward time of the kernel over its tuning knobs (kernel chunk, P block) at one shape, each variant's output
    first compared with the defaults' (the math does not depend on the knobs; only float32 rounding does)."""
    name, b, t, h, p, n = shape
    inp = make_inputs(b, t, h, p, n, seed=1)
    args = [jnp.asarray(inp["x"], jnp.bfloat16), jnp.asarray(inp["dt"]), jnp.asarray(inp["A"]),
            jnp.asarray(inp["B"], jnp.bfloat16), jnp.asarray(inp["C"], jnp.bfloat16), jnp.asarray(inp["dt_bias"])]
    d = jax.nn.softplus(args[1] + args[5])
    y_default = jax.jit(lambda x, d, A, B, C: pk.ssd_scan(x, d, A, B, C))(args[0], d, args[2], args[3], args[4])[0]
    budget_s = BUDGET_S if budget_s is None else budget_s
    for chunk in (32, 64):
        for block_p in (16, 32, 64):
            if p % block_p or time.time() - START > budget_s:
                continue
            row = {"kind": "sweep", "shape": name, "chunk": chunk, "block_p": block_p}
            try:
                fn = jax.jit(lambda x, d, A, B, C, c=chunk, bp=block_p: pk.ssd_scan(x, d, A, B, C, chunk_size=c,
                                                                                  block_p=bp))
                row["rel_err_vs_defaults"] = rel(fn(args[0], d, args[2], args[3], args[4])[0], y_default)
                if row["rel_err_vs_defaults"] > 1e-2:
                    row["error"] = "output disagrees with the defaults'"
                    log("sweep", row)
                    ROWS.append(row)
                    continue
                row["ours_fwd_ms"] = time_jax(fn, args[0], d, args[2], args[3], args[4], reps=reps)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log("sweep", row)
            ROWS.append(row)
            save()


def sweep_stages(shape, reps):
    """Triton pipelining stages of the forward kernel and the backward's dS sweep (ssd.FWD_STAGES / BWD_STAGES) at one
    shape: forward and forward+backward times, outputs and gradients compared with the module defaults' first."""
    name, b, t, h, p, n = shape
    inp = make_inputs(b, t, h, p, n, seed=2)
    args, cots = timing_inputs(inp)
    args = args + cots
    ref = None
    defaults = (pk.FWD_STAGES, pk.BWD_STAGES)
    for fwd_stages, bwd_stages in ((defaults[0], defaults[1]), (1, 1), (3, 1), (4, 1), (3, 2), (3, 3)):
        if time.time() - START > BUDGET_S:
            break
        row = {"kind": "stages", "shape": name, "fwd_stages": fwd_stages, "bwd_stages": bwd_stages}
        pk.FWD_STAGES, pk.BWD_STAGES = fwd_stages, bwd_stages
        try:
            fwd, fb = op_fns("pallas")  # fresh jits: the knobs are read at trace time
            grads, (y, s) = fb(*args)
            ref = (y, s, grads) if ref is None else ref
            row["rel_err_vs_defaults"] = max([rel(y, ref[0]), rel(s, ref[1])] + [rel(g, r) for g, r in zip(grads, ref[2])])
            if row["rel_err_vs_defaults"] > 1e-2:
                row["error"] = "disagrees with the defaults"
            else:
                row["ours_fwd_ms"] = time_jax(fwd, *args[:6], reps=reps)
                row["ours_fwdbwd_ms"] = time_jax(fb, *args, reps=reps)
        except Exception as e:  # noqa: BLE001 - e.g. over the shared memory limit: a result
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            pk.FWD_STAGES, pk.BWD_STAGES = defaults
        log("stages", row)
        ROWS.append(row)
        save()


def table():
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    ratio = lambda r, a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"  # noqa: E731
    lines = ["| shape | ours fwd ms | XLA chunk fwd ms | ours/XLA | ours fwd+bwd ms | XLA fwd+bwd ms | ours/XLA | "
             "FLA simple_gla fwd / fwd+bwd ms | agree (worst rel err) |", "|" + "---|" * 9]
    for r in ROWS:
        if r["kind"] != "bench":
            continue
        worst = max((v for k, v in r.items() if k.startswith("rel_err_")), default=float("nan"))
        lines.append(f"| {r['shape']} | {fmt(r, 'ours_fwd_ms')} | {fmt(r, 'xla_fwd_ms')} | "
                     f"{ratio(r, 'ours_fwd_ms', 'xla_fwd_ms')} | {fmt(r, 'ours_fwdbwd_ms')} | "
                     f"{fmt(r, 'xla_fwdbwd_ms')} | {ratio(r, 'ours_fwdbwd_ms', 'xla_fwdbwd_ms')} | "
                     f"{fmt(r, 'fla_fwd_ms')} / {fmt(r, 'fla_fwdbwd_ms')} | {r.get('agree', '-')} ({worst:.1e}) |")
    sweep_rows = [r for r in ROWS if r["kind"] == "sweep"]
    if sweep_rows:
        lines += ["", "| sweep shape | kernel chunk | block_p | ours fwd ms |", "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['chunk']} | {r['block_p']} | {fmt(r, 'ours_fwd_ms')} |" for r in sweep_rows]
    return "\n".join(lines)


def bwd_blocks(shapes, reps):
    """The chunk-parallel backward's P block and warps (pk.BWD_BLOCK_P, pk.BWD_WARPS, read when the op is traced):
    for each variant and shape, agreement with the XLA chunk form (float32) first, then the forward+backward time
    (bf16 x, B, C)."""
    saved = pk.BWD_BLOCK_P, pk.BWD_WARPS
    try:
        for name, b, t, h, p, n in shapes:
            inp = make_inputs(b, t, h, p, n)
            args, cots = timing_inputs(inp)
            for block, warps in ((64, 8), (64, 4), (128, 4), (128, 8), (32, 4)):
                if block > p:
                    continue
                pk.BWD_BLOCK_P, pk.BWD_WARPS = block, warps
                row = {"kind": "bwd_block", "shape": name, "bwd_block_p": block, "bwd_warps": warps}
                agreement(inp, row)
                if row["agree"]:
                    row["ours_fwdbwd_ms"] = time_jax(op_fns("pallas")[1], *args, *cots, reps=reps)
                log(f"{name} bwd block_p {block} warps {warps}:", {k: v for k, v in row.items() if k.endswith("ms")})
                ROWS.append(row)
                save()
    finally:
        pk.BWD_BLOCK_P, pk.BWD_WARPS = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpret mode: a dry run of the script")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--stages-only", action="store_true",
                    help="only the pipelining-stages sweep at the first shape (sweep_stages), no bench shapes")
    ap.add_argument("--bwd-blocks-only", action="store_true",
                    help="the chunk-parallel backward's P block and warps (ssd.BWD_BLOCK_P, BWD_WARPS): agreement, "
                         "then fwd+bwd")
    ap.add_argument("--knobs-only", action="store_true",
                    help="only the kernel chunk x block_p sweep (sweep), at the first two shapes")
    args = ap.parse_args()
    reps = 10
    if args.smoke:
        SHAPES[:] = [("tiny B1 T80 H2 P32 N16", 1, 80, 2, 32, 16), ("tiny B2 T40 H2 P16 N16", 2, 40, 2, 16, 16)]
        reps = 2
    log("device", jax.devices()[0], "jax", jax.__version__)
    if args.knobs_only:
        for shape in SHAPES[:2]:
            sweep(shape, reps, budget_s=float("inf"))
        for r in ROWS:
            print(r, flush=True)
        return
    if args.bwd_blocks_only:
        bwd_blocks(SHAPES[:2], reps)
        for r in ROWS:
            print(r, flush=True)
        return
    if args.stages_only:
        sweep_stages(SHAPES[0], reps)
        for r in ROWS:
            print(r, flush=True)
        return
    for shape in SHAPES:
        if time.time() - START > BUDGET_S:
            log(f"skipped {shape[0]}: past the {BUDGET_S} s budget")
            ROWS.append({"kind": "bench", "shape": shape[0], "error": "skipped: time budget"})
            continue
        try:
            bench_shape(*shape, reps=reps, with_fla=jax.default_backend() == "gpu")
        except Exception as e:  # noqa: BLE001 - keep the other shapes' numbers
            log(f"FAILED {shape[0]}: {type(e).__name__}: {str(e)[:1500]}")
            ROWS.append({"kind": "bench", "shape": shape[0], "error": f"{type(e).__name__}: {str(e)[:300]}"})
            save()
    if not args.no_sweep:
        sweep(SHAPES[0], reps)
    for r in ROWS:
        errors = {k: v for k, v in r.items() if k.endswith("error")}
        if errors:
            log("error:", r["shape"], errors)
    text = table()
    with open(os.path.join(out_dir(), "bench_ssd.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
