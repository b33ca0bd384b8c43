"""Benchmark: Pallas sliding-window + 128 sinks attention vs cuDNN sliding-window attention (no sinks), on one GPU.

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/bench_swa_attention.py [--sweep] [--quick]

Order: (1) agreement: ours vs a dense float32 reference at T=4096 (forward + gradients), ours with sinks=0 vs cuDNN
at the full size; (2) optional tile sweep at W=4096; (3) timings at T=32768 Hq16 Hkv2 D128 bf16 for W in 1024, 4096,
8192, forward and forward+backward (jax.vjp with a fixed random cotangent), medians of block_until_ready'd calls after
warm-up. Writes JSON to $OUT (or the working directory) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.swa_attention import swa_attention

B, T, HQ, HKV, D = 1, 32768, 16, 2, 128
SINKS = 128
WINDOWS = (1024, 4096, 8192)
START = time.time()


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


def inputs(t, seed=0, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, t, HQ, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, t, HKV, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, t, HKV, D), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (B, t, HQ, D), jnp.float32).astype(dtype)
    return q, k, v, do


def ours(window, sinks, **tiles):
    return lambda q, k, v: swa_attention(q, k, v, window=window, sinks=sinks, **tiles)


def cudnn(window):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0),
                                                        implementation="cudnn")


def dense_reference(window, sinks):
    def attn(q, k, v):
        dtype = q.dtype  # computed in float32, returned in the input dtype so vjp takes the same cotangent
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        t = q.shape[1]
        k, v = jnp.repeat(k, HQ // HKV, axis=2), jnp.repeat(v, HQ // HKV, axis=2)
        pos_q, pos_k = np.arange(t)[:, None], np.arange(t)[None, :]
        mask = (pos_k <= pos_q) & ((pos_q - pos_k < window) | (pos_k < sinks))
        s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * D ** -0.5
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p, v, precision="highest").astype(dtype)
    return attn


def fwd_and_vjp(attn):
    fwd = jax.jit(attn)
    both = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
    return fwd, both


def rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def agree(name, attn_a, attn_b, args, tol):
    fa, ba = fwd_and_vjp(attn_a)
    fb, bb = fwd_and_vjp(attn_b)
    q, k, v, do = args
    errs = {"o": rel_err(fa(q, k, v), fb(q, k, v))}
    for n, x, y in zip(("dq", "dk", "dv"), ba(q, k, v, do), bb(q, k, v, do)):
        errs[n] = rel_err(x, y)
    ok = all(e < tol for e in errs.values())
    log(f"agreement {name}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()) + (" OK" if ok else " FAIL"))
    return ok, errs


def median_ms(fn, args, reps=30, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (min(times), max(times))


def time_pair(attn, args):
    fwd, both = fwd_and_vjp(attn)
    q, k, v, do = args
    f_ms, f_rng = median_ms(fwd, (q, k, v))
    b_ms, b_rng = median_ms(both, (q, k, v, do))
    return {"fwd_ms": f_ms, "fwd_range": f_rng, "fwdbwd_ms": b_ms, "fwdbwd_range": b_rng}


FWD_SWEEP = [dict(block_q=64, block_k=64, num_warps=4, num_stages=3),
             dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
             dict(block_q=128, block_k=128, num_warps=8, num_stages=3),
             dict(block_q=64, block_k=128, num_warps=4, num_stages=3),
             dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
             dict(block_q=64, block_k=64, num_warps=4, num_stages=4)]
BWD_SWEEP = [dict(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=3),
             dict(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2),
             dict(block_q_bwd=32, block_k_bwd=128, num_warps_bwd=4, num_stages_bwd=3),
             dict(block_q_bwd=128, block_k_bwd=32, num_warps_bwd=8, num_stages_bwd=2),
             dict(block_q_bwd=64, block_k_bwd=32, num_warps_bwd=4, num_stages_bwd=3),
             dict(block_q_bwd=32, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)]


def sweep(args, budget_s):
    """Time tile choices at W=4096; returns the best forward and backward settings found within the budget."""
    q, k, v, do = args
    results, best_f, best_b = [], (float("inf"), {}), (float("inf"), {})
    for tiles in FWD_SWEEP:
        if time.time() - START > budget_s:
            break
        try:
            ms, _ = median_ms(jax.jit(ours(4096, SINKS, **tiles)), (q, k, v), reps=10)
        except Exception as e:  # a tile that does not compile (shared memory) is skipped, and said so
            log(f"sweep fwd {tiles}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"sweep fwd {tiles}: {ms:.3f} ms")
        results.append({"tiles": tiles, "fwd_ms": ms})
        best_f = min(best_f, (ms, tiles), key=lambda x: x[0])
    for tiles in BWD_SWEEP:
        if time.time() - START > budget_s:
            break
        full = {**best_f[1], **tiles}
        try:
            _, both = fwd_and_vjp(ours(4096, SINKS, **full))
            ms, _ = median_ms(both, (q, k, v, do), reps=10)
        except Exception as e:
            log(f"sweep bwd {tiles}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"sweep fwd+bwd {full}: {ms:.3f} ms")
        results.append({"tiles": full, "fwdbwd_ms": ms})
        best_b = min(best_b, (ms, tiles), key=lambda x: x[0])
    return {**best_f[1], **best_b[1]}, results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time a few tile choices at W=4096 first")
    parser.add_argument("--quick", action="store_true", help="W=4096 only")
    parser.add_argument("--sweep-budget-s", type=float, default=170.0)
    opts = parser.parse_args()
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.device_kind}, backend {jax.default_backend()}")
    report = {"device": dev.device_kind, "jax": jax.__version__, "shape": dict(B=B, T=T, Hq=HQ, Hkv=HKV, D=D),
              "sinks": SINKS}

    small = inputs(4096, seed=1)
    ok1, e1 = agree("ours(W=1024,S=128) vs dense f32 @T=4096", ours(1024, SINKS), dense_reference(1024, SINKS),
                    small, 2e-2)
    ok2, e2 = agree("ours(W=300,S=1000) vs dense f32 @T=4096", ours(300, 1000), dense_reference(300, 1000),
                    small, 2e-2)
    del small
    args = inputs(T)
    ok3, e3 = agree("ours(W=4096,S=0) vs cuDNN @T=32768", ours(4096, 0), cudnn(4096), args, 2e-2)
    report["agreement"] = {"ref_w1024_s128": e1, "ref_w300_s1000": e2, "cudnn_w4096_s0": e3}
    if not (ok1 and ok2 and ok3):
        log("agreement failed: not timing")
        write(report)
        sys.exit(1)

    tiles = {}
    if opts.sweep:
        tiles, report["sweep"] = sweep(args, opts.sweep_budget_s)
        log(f"chosen tiles {tiles}")
    report["tiles"] = tiles

    rows = []
    for w in ((4096,) if opts.quick else WINDOWS):
        row = {"window": w, "ours": time_pair(ours(w, SINKS, **tiles), args), "cudnn": time_pair(cudnn(w), args)}
        log(f"W={w}: {row}")
        rows.append(row)
    report["rows"] = rows
    write(report)
    print(f"\nB{B} T{T} Hq{HQ} Hkv{HKV} D{D} bf16, ours with {SINKS} sinks, cuDNN without; {dev.device_kind}, "
          f"jax {jax.__version__}; tiles {tiles or 'default'}")
    print("| W | ours fwd ms | cuDNN fwd ms | ratio | ours fwd+bwd ms | cuDNN fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, c = r["ours"], r["cudnn"]
        print(f"| {r['window']} | {o['fwd_ms']:.3f} | {c['fwd_ms']:.3f} | {o['fwd_ms'] / c['fwd_ms']:.2f}x | "
              f"{o['fwdbwd_ms']:.3f} | {c['fwdbwd_ms']:.3f} | {o['fwdbwd_ms'] / c['fwdbwd_ms']:.2f}x |")


def write(report):
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_swa_attention.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
