"""The plain-XLA baseline of issue 3: ahn_jax.ops gated_delta_rule / delta_rule (impl="chunk" and "recurrent")
against flash-linear-attention 0.6.0 in one process, B1 T32768 H16 D128 bf16, forward and forward+backward.

Inputs: q, k L2-normalised, g = logsigmoid(N(0,1)), beta = U(0,1). Outputs are compared with FLA before timing
(relative Frobenius error). jax: block_until_ready medians; torch: triton.testing.do_bench medians.

    PYTHONPATH=$PWD python3 benchmarks/bench_ops_xla.py [--t 32768] [--skip-recurrent]
Prints a table last; JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ahn_jax.ops import delta_rule, gated_delta_rule
from bench_util import forward_backward, time_jax




def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=32768)
    p.add_argument("--skip-recurrent", action="store_true")
    args = p.parse_args()
    B, T, H, D = 1, args.t, 16, 128
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(3))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    g = np.log(1 / (1 + np.exp(-rng.normal(size=(B, T, H))))).astype(np.float32)
    beta = rng.uniform(size=(B, T, H)).astype(np.float32)
    jq, jk, jv = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    jg, jb = jnp.asarray(g), jnp.asarray(beta, jnp.bfloat16)

    import torch
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from triton.testing import do_bench

    tq, tk, tv = (torch.tensor(x, device="cuda", dtype=torch.bfloat16, requires_grad=True) for x in (q, k, v))
    tg = torch.tensor(g, device="cuda", requires_grad=True)
    tb = torch.tensor(beta, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    rows = []
    for name, gated in (("gated_delta_rule", True), ("delta_rule", False)):
        fla_fn = (lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tb)[0]) if gated else \
            (lambda: chunk_delta_rule(tq, tk, tv, tb)[0])
        o_fla = fla_fn().detach().float().cpu().numpy()
        row = {"op": name, "fla_fwd_ms": do_bench(fla_fn, return_mode="median")}
        try:
            def fla_fb():
                o = fla_fn()
                o.sum().backward()
            row["fla_fwdbwd_ms"] = do_bench(fla_fb, return_mode="median")
        except Exception as e:  # FLA's gated backward refuses on Triton 3.6 / Hopper (PERF.md)
            row["fla_bwd_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        impls = ("chunk",) if args.skip_recurrent else ("chunk", "recurrent")
        for impl in impls:
            if gated:
                f = jax.jit(lambda q, k, v, g, b, impl=impl: gated_delta_rule(q, k, v, g, b, impl=impl)[0])
            else:
                f = jax.jit(lambda q, k, v, g, b, impl=impl: delta_rule(q, k, v, b, impl=impl)[0])
            o = np.asarray(f(jq, jk, jv, jg, jb), np.float32)
            row[f"{impl}_rel_err_vs_fla"] = float(np.linalg.norm(o - o_fla) / np.linalg.norm(o_fla))
            row[f"{impl}_fwd_ms"] = time_jax(f, jq, jk, jv, jg, jb, reps=5, warmup=1)
            if impl == "chunk":
                grad = forward_backward(lambda q, k, v, g, b: jnp.sum(f(q, k, v, g, b).astype(jnp.float32)),
                                        (0, 1, 2, 3, 4))
                row["chunk_fwdbwd_ms"] = time_jax(grad, jq, jk, jv, jg, jb, reps=5, warmup=1)
        rows.append(row)
        print(row, flush=True)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "bench_ops_xla.json").write_text(json.dumps(rows, indent=2))

    def f(r, key):
        return f"{r[key]:.2f}" if key in r else "-"

    print(f"\nB{B} T{T} H{H} D{D} bf16, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| op | XLA chunk fwd ms | XLA chunk fwd+bwd ms | recurrent fwd ms | FLA fwd ms | FLA fwd+bwd ms | "
          "chunk fwd / FLA | rel err chunk vs FLA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {f(r, 'chunk_fwd_ms')} | {f(r, 'chunk_fwdbwd_ms')} | {f(r, 'recurrent_fwd_ms')} | "
              f"{f(r, 'fla_fwd_ms')} | {f(r, 'fla_fwdbwd_ms')} | {r['chunk_fwd_ms'] / r['fla_fwd_ms']:.1f}x | "
              f"{r['chunk_rel_err_vs_fla']:.1e} |")


if __name__ == "__main__":
    main()
