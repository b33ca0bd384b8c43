"""Tuning sweep of the Pallas (gated) delta rule at B1 T32768 H16 D128 on the GPU, against FLA 0.6.0.

The sequential kernels walk T / chunk chunks one after another and are latency-bound at batch 1 (128 programs on
132 SMs at block_v 16). This sweep asks which launch knobs pay: chunk 128 (half the sequential steps, more work per
step), Triton's software-pipelining stages (prefetching the next chunks' loads), warps and block_v.
(1) forward variants: each output checked against the float32 token-by-token scan, then timed (the WY kernel alone
too); (2) `--backward`: forward+backward variants of the backward kernels' stages, gradients checked against the
first variant's before timing; (3) `--check-dims`: the defaults compile and agree with the scan at D 64 and 256.
FLA's chunk forward is timed in the same process for the ratio.

Usage (GPU, wheels of flash-linear-attention/fla-core on PYTHONPATH):
  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/sweep_delta_rule.py [--backward] [--check-dims] [--smoke]
Writes $OUT/sweep_delta_rule.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_delta_rule as bdr  # noqa: E402  (sets the JAX memory fraction before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_util import forward_backward, rel, time_jax  # noqa: E402
from pallas_kernels import delta_rule as pk  # noqa: E402
from pallas_kernels import delta_rule_wy as wy  # noqa: E402
from pallas_kernels.common import chunk_cumsum, wy_factors  # noqa: E402

# name, chunk, block_v (None = default), pallas_kernels.delta_rule knobs
# Sweeps on the H100 (2026-11-22, RESULTS.md "Fifth round"): c64 stages 1/2/3/4 2.71/2.10/1.72/1.71 ms, 5 stages and
# chunk 128 with 8 warps or 3 stages over shared memory, chunk 128 5.91 (WY 4.58), 8 warps / block_v 32 slower: 3
# stages became the default (where programs are few). Then the WY kernel (~1.0 ms of the 1.72): 2 / 4 chunks per
# program 1.87 / 1.95 ms (vs 1.03), 2 warps 1.56: kept. Now: bigger diagonal blocks of T.
# Knob names: pallas_kernels.delta_rule attributes, or "wy.<name>" for pallas_kernels.delta_rule_wy.
VARIANTS = [
    ("defaults", 64, None, {}),
    # Diagonal blocks of T (WY_SUB): 32 is faster (fifth session: fwd 1.697 -> 1.532 ms, WY kernel 0.938 -> 0.771; 64:
    # 1.597; 8 warps at 32 / 64: 1.975 / 2.094) but loses all precision on correlated ungated keys (wy_precision), so
    # the default stays 16; timed here to follow the gap.
    ("wy sub32", 64, None, {"wy.WY_SUB": 32}),
]
# Backward knobs (forward+backward timed). Backward stages 2-3 gave nothing (fourth session); WY_SUB 32 vs 16 in the
# WY VJP kernel: 13.05 vs 13.13 ms (fifth session).
BWD_VARIANTS = [
    ("bwd defaults", {}),
    ("wy sub32", {"wy.WY_SUB": 32}),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,32768,16,128", help="B,T,H,D")
    ap.add_argument("--smoke", action="store_true", help="tiny shape in interpret mode (CPU check of the script)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward variants (BWD_VARIANTS)")
    ap.add_argument("--check-dims", action="store_true",
                    help="also check that the defaults compile and agree with the scan at D 64 and 256 (T 4096)")
    args = ap.parse_args(argv)
    b, t, h, d = (int(n) for n in ("1,256,2,32" if args.smoke else args.shape).split(","))
    x = bdr.make_inputs(b, t, h, d)
    q, k, v, g, beta, _ = bdr.device_inputs(x, True)
    o_ref, _ = jax.jit(bdr.scan_reference, static_argnums=5)(q, k, v, g, beta, d ** -0.5)
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": [b, t, h, d], "rows": []}
    interp = jax.default_backend() not in ("gpu", "tpu")
    if not args.no_fla and not args.smoke:
        import torch
        import triton

        tq = {n: torch.from_numpy(x[n]).cuda().to(torch.bfloat16) for n in ("q", "k", "v", "beta")}
        tg = torch.from_numpy(x["g"]).cuda()
        f = bdr.fla_fn(True)
        o_fla = f(tq["q"], tq["k"], tq["v"], tg, tq["beta"])
        out["fla"] = {"rel_err_vs_scan": rel(jnp.asarray(o_fla.float().cpu().numpy()), o_ref),
                      "fwd_ms": triton.testing.do_bench(lambda: f(tq["q"], tq["k"], tq["v"], tg, tq["beta"]),
                                                        return_mode="median")}
        print("fla", out["fla"], flush=True)
        del tq, tg
        torch.cuda.empty_cache()
    for name, chunk, block_v, knobs in VARIANTS:
        row = {"variant": name, "chunk": chunk, "block_v": block_v, "knobs": knobs}
        with variant(knobs, row):
            fwd = jax.jit(lambda q, k, v, g, beta, c=chunk, bv=block_v: pk.gated_delta_rule(
                q, k, v, g, beta, scale=d ** -0.5, chunk_size=c, block_v=bv, interpret=interp or None)[0])
            row["rel_err_vs_scan"] = rel(fwd(q, k, v, g, beta), o_ref)
            if row["rel_err_vs_scan"] > 1e-2:
                row["skipped"] = "disagrees with the float32 scan"
            else:
                row["fwd_ms"] = time_jax(fwd, q, k, v, g, beta, reps=20, warmup=3)
                gc = chunk_cumsum(g, chunk)
                wyf = jax.jit(lambda q, k, v, beta, gc, c=chunk: wy.wy_factors_pallas(k, v, beta, gc, c,
                                                                                      interpret=interp, q=q))
                row["wy_ms"] = time_jax(wyf, q, k, v, beta, gc, reps=20, warmup=3)
                if "fla" in out:
                    row["vs_fla"] = row["fwd_ms"] / out["fla"]["fwd_ms"]
        _record(out, "rows", row)
    if args.backward:
        backward_variants(out, q, k, v, g, beta, x, d, interp)
    if args.check_dims:
        check_dims(out, args.smoke, interp)
    wy_precision(out, args.smoke, interp)
    print(f"\n{'variant':<16}{'fwd ms':>9}{'WY ms':>8}{'x FLA':>7}{'rel err':>9}")
    for r in out["rows"]:
        print(f"{r['variant']:<16}{r.get('fwd_ms', float('nan')):>9.3f}{r.get('wy_ms', float('nan')):>8.3f}"
              f"{r.get('vs_fla', float('nan')):>7.2f}{r.get('rel_err_vs_scan', float('nan')):>9.1e}"
              f"  {r.get('error', r.get('skipped', ''))[:80]}")
    for r in out.get("backward", []):
        print(f"{r['variant']:<20} fwd+bwd {r.get('fwdbwd_ms', float('nan')):8.3f} ms  grad rel vs first "
              f"{r.get('grad_rel_err', float('nan')):.1e}  {r.get('error', r.get('skipped', ''))[:80]}")
    for r in out.get("dims", []):
        print("dims", r)
    for r in out.get("wy_precision", []):
        print("wy precision", r)
    return out


@contextlib.contextmanager
def variant(knobs, row):
    """Run one variant with `knobs` set: restored afterwards, and an exception (a variant that fails to compile is a
    result) recorded as row["error"] instead of raised."""
    prev = bdr.set_knobs(knobs)
    try:
        yield
    except Exception as e:  # noqa: BLE001
        row["error"] = bdr.err(e)
    finally:
        bdr.set_knobs(prev)


def _record(out, table, row):
    print(row, flush=True)
    out.setdefault(table, []).append(row)
    _save(out)


def _save(out):
    with open(os.path.join(bdr.out_dir(), "sweep_delta_rule.json"), "w") as fh:
        json.dump(out, fh, indent=1)


def backward_variants(out, q, k, v, g, beta, x, d, interp):
    cot = jnp.asarray(x["cot"], jnp.bfloat16)
    first = None
    for name, knobs in BWD_VARIANTS:
        row = {"variant": name, "knobs": knobs}
        with variant(knobs, row):
            fb = forward_backward(lambda q, k, v, g, beta, cot: jnp.sum(pk.gated_delta_rule(
                q, k, v, g, beta, scale=d ** -0.5, interpret=interp or None)[0].astype(jnp.float32) * cot),
                (0, 1, 2, 3, 4))
            grads = fb(q, k, v, g, beta, cot)
            first = grads if first is None else first
            row["grad_rel_err"] = max(rel(a, b) for a, b in zip(grads, first))
            if row["grad_rel_err"] > 1e-2:
                row["skipped"] = "gradients disagree with the first variant's"
            else:
                row["fwdbwd_ms"] = time_jax(fb, q, k, v, g, beta, cot, reps=10, warmup=2)
        _record(out, "backward", row)


def wy_precision(out, smoke, interp):
    """WY_SUB's effect on accuracy where it is hardest: strongly correlated keys (every key + 2x the sequence's first
    key, then normalised: cosines ~0.8, as keys sharing a bias direction), beta ~ U(0, 1), gated and plain. The larger
    product-form blocks multiply more powers of a far-from-identity N (CPU float32: W rel error 2.6e-7 at 16, 1.0e-5 at
    32, 9.7e-3 at 64), and on the GPU the kernel's float32 dots may run as TF32. Compared: the W, U factors with the
    float32 triangular solve at the highest precision, and the whole forward with the float32 token scan."""
    b, t, h, d = (1, 128, 2, 32) if smoke else (1, 4096, 16, 128)
    x = bdr.make_inputs(b, t, h, d, seed=7)
    k = x["k"] + 2.0 * x["k"][:, :1]
    x["k"] = k / np.linalg.norm(k, axis=-1, keepdims=True)
    out["wy_precision"] = []
    for gated in (True, False):
        q, k, v, g, beta, _ = bdr.device_inputs(x, gated)
        o_ref, _ = jax.jit(bdr.scan_reference, static_argnums=5)(q, k, v, g, beta, d ** -0.5)
        gc = chunk_cumsum(g, 64) if gated else None
        f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            w_ref, u_ref = jax.jit(lambda k, v, beta, gc: wy_factors(k, v, beta, gc, 64))(f32(k), f32(v), f32(beta),
                                                                                          gc)
        for sub in (16, 32, 64):
            row = {"gated": gated, "wy_sub": sub}
            with variant({"wy.WY_SUB": sub}, row):
                w, u = jax.jit(lambda k, v, beta, gc: wy.wy_factors_pallas(k, v, beta, gc, 64, interpret=interp))(
                    k, v, beta, gc)
                o = jax.jit(lambda q, k, v, g, beta: pk.gated_delta_rule(
                    q, k, v, g, beta, scale=d ** -0.5, interpret=interp or None)[0])(q, k, v, g, beta)
                row.update(w_rel_err=rel(w, w_ref), u_rel_err=rel(u, u_ref), o_rel_err_vs_scan=rel(o, o_ref))
            _record(out, "wy_precision", row)


def check_dims(out, smoke, interp):
    """The defaults at D 64 and 256: forward output and final state against the float32 scan, and one backward."""
    out["dims"] = []
    for d in (64, 256):
        # D 256 at T 2048 H 8: the float32 token scan's VJP (the reference) asked for 64.5 GiB at T 4096 H 16.
        b, t, h = (1, 128, 2) if smoke else ((1, 4096, 16) if d == 64 else (1, 2048, 8))
        x = bdr.make_inputs(b, t, h, d, seed=d)
        q, k, v, g, beta, cot = bdr.device_inputs(x, True)
        row = {"shape": [b, t, h, d]}
        try:
            o_ref, _ = jax.jit(bdr.scan_reference, static_argnums=5)(q, k, v, g, beta, d ** -0.5)
            fwd = jax.jit(lambda q, k, v, g, beta: pk.gated_delta_rule(q, k, v, g, beta, scale=d ** -0.5,
                                                                       interpret=interp or None)[0])
            row["rel_err_vs_scan"] = rel(fwd(q, k, v, g, beta), o_ref)
            fb = jax.jit(jax.grad(lambda q, k, v, g, beta: jnp.sum(pk.gated_delta_rule(
                q, k, v, g, beta, scale=d ** -0.5, interpret=interp or None)[0].astype(jnp.float32) * cot),
                (0, 1, 2, 3, 4)))
            fb_ref = jax.jit(jax.grad(lambda q, k, v, g, beta: jnp.sum(bdr.scan_reference(
                q, k, v, g, beta, d ** -0.5)[0] * cot.astype(jnp.float32)), (0, 1, 2, 3, 4)))
            row["grad_rel_err_vs_scan"] = max(rel(a, b) for a, b in zip(fb(q, k, v, g, beta),
                                                                       fb_ref(q, k, v, g, beta)))
        except Exception as e:  # noqa: BLE001
            row["error"] = bdr.err(e)
        print("dims", row, flush=True)
        out["dims"].append(row)
        _save(out)


if __name__ == "__main__":
    main()
