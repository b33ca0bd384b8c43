"""Benchmark: Pallas chunked (gated) delta rule vs flash-linear-attention 0.6.0 (Triton), one process, one GPU.

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/bench_delta_rule.py            # GPU, < 8 min on an H100
  PYTHONPATH=$PWD python3 benchmarks/bench_delta_rule.py --smoke                       # CPU dry run (interpret mode)

Order: (1) smoke: ours (default backward) vs a token-by-token float32 scan at a small shape (forward, final state,
every gradient); (2) backward variants at the first shape (gated): the WY preparation's backward alone (jax.vjp through
XLA's triangular solve vs the explicit matmul-only VJP, blocked inverse and solve; agreement first), then fwd+bwd of
every BWD_VARIANTS entry (new = the defaults: explicit VJP + split sweep; the jax.vjp preparation; block/warp options;
gradients compared with "new" before timing), the fastest agreeing one kept for (3); `--tune-forward` also re-times
the WY inverses; (3) per shape (B1 T32768 H16 D128; B8 T4096; B1 T131072; B1 T32768 D256) x (gated, plain): ours' and
FLA's outputs against the float32 scan, ours' gradients against FLA's, all BEFORE timing; then forward and
forward+backward (gradients of sum(o * cot) in q, k, v, g, beta) medians (jax: block_until_ready per call; torch:
triton.testing.do_bench median). FLA failures (its gated backward refused on Triton 3.6) are recorded, not fatal.
Inputs [B,T,H,D] bf16: q, k L2-normalised, g = logsigmoid(N(0,1)), beta = U(0,1). Shapes past --budget-s are skipped
(recorded). JSON to $OUT/bench_delta_rule.json, the table to stdout and $OUT/bench_delta_rule.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

# JAX takes 75% of the GPU by default; FLA (torch) runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import delta_rule as pk  # noqa: E402
from pallas_kernels import delta_rule_wy as wy  # noqa: E402
from pallas_kernels.common import chunk_cumsum, wy_factors, wy_factors_and_vjp  # noqa: E402
from bench_util import forward_backward, rel, time_jax  # noqa: E402

START = time.time()
CHUNK = 64
SHAPES = [("B1 T32768 H16 D128", 1, 32768, 16, 128), ("B8 T4096 H16 D128", 8, 4096, 16, 128),
          ("B1 T131072 H16 D128", 1, 131072, 16, 128), ("B1 T32768 H16 D256", 1, 32768, 16, 256)]
SMOKE_SHAPES = [("smoke B1 T128 H2 D32", 1, 128, 2, 32), ("smoke B2 T100 H1 D32", 2, 100, 1, 32)]  # tune: T % 64 == 0
ROWS = []
GRAD_NAMES = ("q", "k", "v", "g", "beta")


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


def out_dir():
    d = os.environ.get("OUT", ".")
    os.makedirs(d, exist_ok=True)
    return d


def save():
    with open(os.path.join(out_dir(), "bench_delta_rule.json"), "w") as f:
        json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": ROWS}, f, indent=1)


def err(e):
    return f"{type(e).__name__}: {str(e)[:400]}"


def make_inputs(b, t, h, d, seed=0):
    """Host float32 arrays (shared by jax and torch)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d), dtype=np.float32)
    k = rng.standard_normal((b, t, h, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, t, h, d), dtype=np.float32)
    g = -np.logaddexp(0.0, -rng.standard_normal((b, t, h))).astype(np.float32)  # logsigmoid(N(0,1))
    beta = rng.uniform(0.0, 1.0, (b, t, h)).astype(np.float32)
    cot = rng.standard_normal((b, t, h, d), dtype=np.float32)
    return dict(q=q, k=k, v=v, g=g, beta=beta, cot=cot)


def device_inputs(x, gated, dtype=jnp.bfloat16):
    q, k, v, beta, cot = (jnp.asarray(x[n], dtype) for n in ("q", "k", "v", "beta", "cot"))
    return q, k, v, (jnp.asarray(x["g"]) if gated else None), beta, cot


def scan_reference(q, k, v, g, beta, scale):
    """Token-by-token float32 recurrence (full-precision matmuls): the truth for the agreement checks."""
    def step(s, xs):
        qt, kt, vt, gt, bt = xs
        if gt is not None:
            s = s * jnp.exp(gt)[:, :, None, None]
        upd = bt[..., None] * (vt - jnp.einsum("bhkv,bhk->bhv", s, kt, precision="highest"))
        s = s + kt[..., :, None] * upd[..., None, :]
        return s, scale * jnp.einsum("bhkv,bhk->bhv", s, qt, precision="highest")

    f32 = lambda x: None if x is None else jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731
    s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    s, o = jax.lax.scan(step, s0, tuple(f32(x) for x in (q, k, v, g, beta)))
    return jnp.moveaxis(o, 0, 1), s


def ours_fns(d, gated):
    """jitted forward and forward+backward (gradients in q, k, v, [g,] beta) of ours; built fresh so that the module
    knobs set right before are traced in."""
    def ours(q, k, v, g, beta):
        return pk.gated_delta_rule(q, k, v, g, beta, scale=d ** -0.5, chunk_size=CHUNK)[0]

    argn = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 4)
    fb = forward_backward(lambda q, k, v, g, beta, cot: jnp.sum(ours(q, k, v, g, beta).astype(jnp.float32) * cot),
                          argn)
    return jax.jit(ours), fb


def grad_names(gated):
    return [n for n in GRAD_NAMES if gated or n != "g"]


def smoke(quick):
    """Small-shape check of the (compiled on GPU) kernel: forward, final state and every gradient vs the scan."""
    dtypes = (jnp.float32,) if quick else (jnp.float32, jnp.bfloat16)
    b, t, h, d = (1, 40, 1, 16) if quick else (2, 200, 2, 64)
    for gated in (True, False):
        for dtype in dtypes:
            x = make_inputs(b, t, h, d, seed=1)
            q, k, v, g, beta, cot = device_inputs(x, gated, jnp.float32)
            scale = d ** -0.5

            def loss_ours(q, k, v, g, beta):
                o, s = pk.gated_delta_rule(q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta.astype(dtype),
                                           scale=scale, output_final_state=True, chunk_size=16 if quick else CHUNK)
                return jnp.sum(o.astype(jnp.float32) * cot) + jnp.sum(s), (o, s)

            def loss_ref(q, k, v, g, beta):
                o, s = scan_reference(q, k, v, g, beta, scale)
                return jnp.sum(o * cot) + jnp.sum(s), (o, s)

            argn = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 4)
            (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss_ours, argn, has_aux=True))(q, k, v, g, beta)
            (_, (o_r, s_r)), gr_r = jax.jit(jax.value_and_grad(loss_ref, argn, has_aux=True))(q, k, v, g, beta)
            errs = {"o": rel(o, o_r), "state": rel(s, s_r)}
            errs.update({f"d{n}": rel(a, b_) for n, a, b_ in zip(grad_names(gated), gr, gr_r)})
            log(f"smoke gated={gated} {jnp.dtype(dtype).name}:", {n: f"{e:.1e}" for n, e in errs.items()})
            ROWS.append({"kind": "smoke", "gated": gated, "dtype": jnp.dtype(dtype).name, "rel_err": errs})


def tune_forward(shape, res):
    """WY diagonal-block inverse: substitution vs product form (agreement with the XLA solve first), kept if faster."""
    name, b, t, h, d = shape
    x = make_inputs(b, t, h, d)
    q, k, v, g, beta, _ = device_inputs(x, True)
    gc = chunk_cumsum(g, CHUNK)
    w_ref, u_ref = jax.jit(lambda k, v, beta, gc: wy_factors(k, v, beta, gc, CHUNK))(k, v, beta, gc)
    interp = jax.default_backend() not in ("gpu", "tpu")
    best = None
    for method in ("substitution", "product"):
        fn = jax.jit(lambda q, k, v, beta, gc: wy.wy_factors_pallas(k, v, beta, gc, CHUNK, interpret=interp, q=q,
                                                                     method=method))
        try:
            w, u, _ = fn(q, k, v, beta, gc)
            res[f"wy_{method}_rel_err"] = {"w": rel(w, w_ref), "u": rel(u, u_ref)}
            res[f"wy_{method}_ms"] = time_jax(fn, q, k, v, beta, gc, reps=20, warmup=3)
        except Exception as e:  # noqa: BLE001 - record and go on
            res[f"wy_{method}_error"] = err(e)
            continue
        ok = max(res[f"wy_{method}_rel_err"].values()) < 1e-2
        if ok and (best is None or res[f"wy_{method}_ms"] < best[0]):
            best = (res[f"wy_{method}_ms"], method)
    if best is not None:
        wy.WY_INVERSE = best[1]
    res["wy_inverse"] = wy.WY_INVERSE
    log("tune forward", name, res)


# Backward variants timed against each other at the first shape (gated), gradients compared with "new" first.
# Knob names are pallas_kernels.delta_rule module attributes; unspecified knobs keep the module defaults.
BWD_VARIANTS = [
    ("new", {}),  # explicit XLA WY VJP (blocked inverse) + split sweep: the defaults
    # The round-3 preparation backward with the new sweep (round 3's whole backward, with the per-V-block partials
    # sweep since removed, took 34.7 ms on the H100; round 4 run, RESULTS.md).
    ("jax_vjp prep", {"WY_BWD": "jax_vjp"}),
    ("new bwd_bv32", {"BWD_BLOCK_V": 32}),
    ("new dqkw_w8", {"DQKW_WARPS": 8}),
    ("new dqkw_bk128_bv64", {"DQKW_BLOCK_K": 128, "DQKW_BLOCK_V": 64, "DQKW_WARPS": 8}),
]


def set_knobs(knobs):
    """Set pallas_kernels.delta_rule knobs, or delta_rule_wy's with a "wy." prefix; returns the previous values (to
    restore)."""
    prev = {}
    for name, value in knobs.items():
        module, attr = (wy, name[3:]) if name.startswith("wy.") else (pk, name)
        prev[name] = getattr(module, attr)
        setattr(module, attr, value)
    return prev


def compare_backward(shape, res, quick):
    """The WY preparation's backward alone (jax.vjp through the triangular solve vs the explicit matmul VJP, both
    inverses; agreement first), then every BWD_VARIANTS fwd+bwd (gradients vs "new" first), then the best kept."""
    name, b, t, h, d = shape
    if t % CHUNK:
        raise ValueError(f"compare_backward needs T a multiple of {CHUNK}, got {t}")
    x = make_inputs(b, t, h, d)
    q, k, v, g, beta, cot = device_inputs(x, True)
    rng = np.random.default_rng(5)
    dw = jnp.asarray(rng.standard_normal(k.shape, dtype=np.float32))
    du = jnp.asarray(rng.standard_normal(v.shape, dtype=np.float32))

    def prep_old(k, v, g, beta, dw, du):
        (w, u, _), vjp = jax.vjp(lambda k_, v_, g_, b_: pk._prepare(k_, v_, g_, b_, CHUNK), k, v, g, beta)
        return vjp((dw.astype(k.dtype), du.astype(v.dtype), jnp.zeros((b, h, t), jnp.float32))) + (w, u)

    def prep_explicit(inverse):
        def fn(k, v, g, beta, dw, du):
            gc, cvjp = jax.vjp(lambda g_: chunk_cumsum(g_, CHUNK), g)
            w, u, vjp = wy_factors_and_vjp(k, v, beta, gc, CHUNK, inverse)
            dk, dv, dbeta, dgc = vjp(dw, du)
            return dk, dv, cvjp(dgc)[0], dbeta, w, u  # w, u returned so that the recompute is timed, not eliminated
        return fn

    reps = dict(reps=3, warmup=1) if quick else dict(reps=10, warmup=2)
    try:
        old = jax.jit(prep_old)
        want = old(k, v, g, beta, dw, du)[:4]
        res["prep_bwd_old_ms"] = time_jax(old, k, v, g, beta, dw, du, **reps)
        for inverse in ("blocked", "solve"):
            fn = jax.jit(prep_explicit(inverse))
            got = fn(k, v, g, beta, dw, du)[:4]
            res[f"prep_bwd_{inverse}_rel_err"] = {n: rel(y, x_) for n, x_, y in zip(("dk", "dv", "dg", "dbeta"),
                                                                                      want, got)}
            res[f"prep_bwd_{inverse}_ms"] = time_jax(fn, k, v, g, beta, dw, du, **reps)
    except Exception as e:  # noqa: BLE001
        res["prep_bwd_error"] = err(e)
    log("prep backward alone", {n: res[n] for n in res if n.startswith("prep_bwd")})

    grads, times = {}, {}
    for label, knobs in BWD_VARIANTS:
        if d % knobs.get("BWD_BLOCK_V", 1):  # the DQKW blocks fall back to the whole dimension by themselves
            continue
        prev = set_knobs(knobs)
        try:
            _, fb = ours_fns(d, True)
            grads[label] = fb(q, k, v, g, beta, cot)
            if label != "new" and "new" in grads:
                res[f"grad_rel_err[{label} vs new]"] = {n: rel(a, b_) for n, a, b_ in
                                                        zip(GRAD_NAMES, grads[label], grads["new"])}
            times[label] = time_jax(fb, q, k, v, g, beta, cot, **({"reps": 2, "warmup": 1} if quick else reps))
            res[f"fwdbwd[{label}]_ms"] = times[label]
        except Exception as e:  # noqa: BLE001
            res[f"fwdbwd[{label}]_error"] = err(e)
        finally:
            set_knobs(prev)
        if label != "new":
            grads.pop(label, None)  # keep only "new"'s gradients on the device
        log(f"fwd+bwd {label}:", {n: res[n] for n in res if f"[{label}" in n})
    ok = [lab for lab in times if lab == "new" or
          max(res.get(f"grad_rel_err[{lab} vs new]", {"x": 1.0}).values()) < 2e-2]
    if ok:
        best = min(ok, key=times.get)
        set_knobs(dict(BWD_VARIANTS)[best])
        res["best_bwd"] = {"variant": best, "fwdbwd_ms": times[best]}
        log("best backward variant (kept for the shapes below)", res["best_bwd"])


def fla_fn(gated):
    if gated:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]
    from fla.ops.delta_rule import chunk_delta_rule
    return lambda q, k, v, g, beta: chunk_delta_rule(q, k, v, beta, scale=q.shape[-1] ** -0.5)[0]


def bench_fla(row, x, gated, o_ref, ours_grads):
    import torch
    import triton

    tq = {n: torch.from_numpy(x[n]).cuda().to(torch.bfloat16) for n in ("q", "k", "v", "beta", "cot")}
    tg = torch.from_numpy(x["g"]).cuda() if gated else None
    f = fla_fn(gated)
    o_fla = f(tq["q"], tq["k"], tq["v"], tg, tq["beta"])
    row["fla_rel_err"] = rel(jnp.asarray(o_fla.float().cpu().numpy()), o_ref)
    row["fla_fwd_ms"] = triton.testing.do_bench(lambda: f(tq["q"], tq["k"], tq["v"], tg, tq["beta"]),
                                                return_mode="median")
    leaves = {n: tq[n].clone().requires_grad_(True) for n in ("q", "k", "v", "beta")}
    if gated:
        leaves["g"] = tg.clone().requires_grad_(True)

    def fla_fb():
        o = f(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves["beta"])
        o.backward(tq["cot"])

    try:
        fla_fb()
        if ours_grads is not None:
            row["grad_rel_err_ours_vs_fla"] = {
                n: rel(a, jnp.asarray(leaves[n].grad.float().cpu().numpy()))
                for n, a in zip(grad_names(gated), ours_grads)}
        row["fla_fwdbwd_ms"] = triton.testing.do_bench(fla_fb, return_mode="median")
    except Exception as e:  # noqa: BLE001 - FLA's gated backward refuses on Triton 3.6 / Hopper: FLA's failure
        row["fla_bwd_error"] = err(e)
    tq.clear()  # free the tensors (clear, not del: the closures above refer to these names)
    leaves.clear()
    torch.cuda.empty_cache()


def bench_shape(shape, gated, with_xla):
    name, b, t, h, d = shape
    x = make_inputs(b, t, h, d)
    q, k, v, g, beta, cot = device_inputs(x, gated)
    op = "gated_delta_rule" if gated else "delta_rule"
    row = {"kind": "bench", "op": op, "shape": name}
    fwd, fb = ours_fns(d, gated)
    o_ref = jax.jit(lambda *a: scan_reference(*a, d ** -0.5)[0])(q, k, v, g, beta)
    row["ours_rel_err"] = rel(fwd(q, k, v, g, beta), o_ref)
    ours_grads = None
    try:
        ours_grads = fb(q, k, v, g, beta, cot)
    except Exception as e:  # noqa: BLE001
        row["ours_bwd_error"] = err(e)
    if jax.default_backend() == "gpu":
        try:
            bench_fla(row, x, gated, o_ref, ours_grads)
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = err(e)
    else:
        row["fla_error"] = "skipped: no GPU"
    log(f"{op} {name} agreement:", {n: row[n] for n in row if "err" in n})
    row["ours_fwd_ms"] = time_jax(fwd, q, k, v, g, beta, reps=20, warmup=3)
    if ours_grads is not None:
        row["ours_fwdbwd_ms"] = time_jax(fb, q, k, v, g, beta, cot, reps=10, warmup=3)
    if with_xla:
        try:
            from ahn_jax.ops import gated_delta as ops_dr
            xla = jax.jit(lambda q, k, v, g, beta: (ops_dr.gated_delta_rule(q, k, v, g, beta, impl="chunk") if gated
                                                    else ops_dr.delta_rule(q, k, v, beta, impl="chunk"))[0])
            row["xla_rel_err"] = rel(xla(q, k, v, g, beta), o_ref)
            row["xla_fwd_ms"] = time_jax(xla, q, k, v, g, beta, reps=5, warmup=3)
        except Exception as e:  # noqa: BLE001
            row["xla_error"] = err(e)
    log(f"{op} {name}:", {n: row[n] for n in row if n.endswith("_ms")})
    ROWS.append(row)
    save()


def table():
    lines = ["| op | shape | ours fwd ms | FLA fwd ms | fwd ratio | ours fwd+bwd ms | FLA fwd+bwd ms | ratio | "
             "o rel err ours / FLA (vs f32 scan) | max grad rel err ours vs FLA |", "|" + "---|" * 10]
    fmt = lambda r, n: f"{r[n]:.3f}" if n in r else "-"  # noqa: E731
    for r in ROWS:
        if r["kind"] != "bench":
            continue
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['error'][:80]} |" + " |" * 8)
            continue
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"  # noqa: E731
        fla_fb = fmt(r, "fla_fwdbwd_ms") if "fla_bwd_error" not in r else "FLA failed"
        gerr = r.get("grad_rel_err_ours_vs_fla")
        lines.append(f"| {r['op']} | {r['shape']} | {fmt(r, 'ours_fwd_ms')} | {fmt(r, 'fla_fwd_ms')} | "
                     f"{ratio('ours_fwd_ms', 'fla_fwd_ms')} | {fmt(r, 'ours_fwdbwd_ms')} | {fla_fb} | "
                     f"{ratio('ours_fwdbwd_ms', 'fla_fwdbwd_ms')} | {r.get('ours_rel_err', float('nan')):.1e} / "
                     f"{r.get('fla_rel_err', float('nan')):.1e} | "
                     f"{'-' if not gerr else f'{max(gerr.values()):.1e}'} |")
    for r in ROWS:
        if r["kind"] != "tune":
            continue
        lines += ["", f"Backward variants at {r['shape']} (gated; fwd+bwd ms, max grad rel err vs new):", ""]
        lines += ["| variant | fwd+bwd ms | max grad rel err vs new |", "|---|---|---|"]
        for label, _ in BWD_VARIANTS:
            ms = r.get(f"fwdbwd[{label}]_ms")
            e = r.get(f"grad_rel_err[{label} vs new]")
            lines.append(f"| {label} | {'-' if ms is None else f'{ms:.3f}'} | "
                         f"{'-' if not e else f'{max(e.values()):.1e}'} |")
        pb = {n: (round(x, 3) if isinstance(x, float) else x) for n, x in r.items() if n.startswith("prep_bwd")}
        lines += ["", f"WY preparation backward alone: jax.vjp {pb.get('prep_bwd_old_ms', '-')} ms, explicit blocked "
                  f"{pb.get('prep_bwd_blocked_ms', '-')} ms, explicit solve {pb.get('prep_bwd_solve_ms', '-')} ms; "
                  f"best {r.get('best_bwd')}; WY inverse {r.get('wy_inverse', wy.WY_INVERSE)}."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", "--tiny", action="store_true", help="tiny shapes: a dry run of the script on CPU")
    ap.add_argument("--no-tune", action="store_true", help="skip the backward variants")
    ap.add_argument("--tune-forward", action="store_true", help="also time the WY inverses (product is the default)")
    ap.add_argument("--xla", action="store_true", help="also time the pure-XLA chunk op at the first shape")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip the shapes not started by then")
    ap.add_argument("--only", default=None,
                    help="comma-separated op:shape-index pairs to run, e.g. 'gated:1,gated:2,plain:1' (default: all)")
    args = ap.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    log("device", jax.devices()[0], "jax", jax.__version__)
    smoke(quick=args.smoke)
    save()
    if not args.no_tune:
        res = {"kind": "tune", "shape": shapes[0][0]}
        steps = ((tune_forward,) if args.tune_forward else ()) + (compare_backward,)
        for step in steps:
            try:
                step(shapes[0], res) if step is tune_forward else step(shapes[0], res, args.smoke)
            except Exception as e:  # noqa: BLE001 - keep the rest of the run useful
                res[f"{step.__name__}_error"] = err(e)
                log(f"{step.__name__} failed:", err(e))
        ROWS.append(res)
        save()
    # Most informative first, so that the time budget drops the least: both ops at the first shape, then the plain
    # rule (FLA's gated backward fails on Triton 3.6, so fwd+bwd ratios exist only for the plain rule), then gated.
    plan = [(shapes[0], True), (shapes[0], False)] + [(s, False) for s in shapes[1:]] + [(s, True) for s in shapes[1:]]
    if args.only:
        wanted = {(op == "gated", int(i)) for op, i in (item.split(":") for item in args.only.split(","))}
        plan = [(s, gated) for s, gated in plan if (gated, shapes.index(s)) in wanted]
    for i, (shape, gated) in enumerate(plan):
        op = "gated_delta_rule" if gated else "delta_rule"
        if time.time() - START > args.budget_s:
            ROWS.append({"kind": "bench", "op": op, "shape": shape[0], "error": "skipped: time budget"})
            continue
        try:
            bench_shape(shape, gated, with_xla=args.xla and i == 0)
        except Exception as e:  # noqa: BLE001 - keep the other shapes' numbers
            log(f"FAILED {shape[0]} {op}: {err(e)}")
            ROWS.append({"kind": "bench", "op": op, "shape": shape[0], "error": err(e)})
    save()
    for r in ROWS:
        errs = {n: r[n] for n in r if n.endswith("error") and "rel" not in n}
        if errs:
            log("error:", errs)
    text = table()
    with open(os.path.join(out_dir(), "bench_delta_rule.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
