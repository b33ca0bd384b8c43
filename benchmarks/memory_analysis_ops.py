"""Compile-only memory analysis of forward+backward of the chunked memory recurrences (DESIGN.md pitfall 11).

Lowers and compiles `grad(sum(outputs))` wrt every input for gated_delta_rule "chunk" (q, k, v, g, beta) and ssd "chunk"
(x, dt, A, B, C) at B1 H16 D128 bf16 and prints XLA's temp / argument / output bytes. Nothing is executed, so this runs
on the CPU backend of a laptop; the numbers are the CPU compiler's buffer assignment (a GPU compile may differ).

Also prints, for comparison, what a backward that kept one float32 state per token would need (T*H*K*V*4 bytes), and
what the chunk-boundary states alone take (n_chunks*H*K*V*4 bytes).

    python benchmarks/memory_analysis_ops.py                # T=32768
    python benchmarks/memory_analysis_ops.py --t 8192 --ops gdr
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from ahn_jax.ops.gated_delta import gated_delta_rule
from ahn_jax.ops.mamba_ssd import ssd


def _gdr_case(t, h, d, chunk, dtype):
    shapes = [(1, t, h, d), (1, t, h, d), (1, t, h, d), (1, t, h), (1, t, h)]
    dtypes = [dtype, dtype, dtype, jnp.float32, dtype]

    def loss(q, k, v, g, beta):
        o, _ = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, chunk_size=chunk, impl="chunk")
        return jnp.sum(o.astype(jnp.float32))

    return loss, [jax.ShapeDtypeStruct(s, dt) for s, dt in zip(shapes, dtypes)]


def _ssd_case(t, h, d, chunk, dtype):
    shapes = [(1, t, h, d), (1, t, h), (h,), (1, t, h, d), (1, t, h, d)]  # one B/C group per head, as in AHN
    dtypes = [dtype, jnp.float32, jnp.float32, dtype, dtype]

    def loss(x, dt, A, B, C):
        return jnp.sum(ssd(x, dt, A, B, C, chunk_size=chunk, dt_softplus=True, impl="chunk").astype(jnp.float32))

    return loss, [jax.ShapeDtypeStruct(s, dt) for s, dt in zip(shapes, dtypes)]


def analyse(name, make, t, h, d, chunk, dtype):
    loss, args = make(t, h, d, chunk, dtype)
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, tuple(range(len(args))))).lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    n_chunks = -(-t // chunk)
    return {
        "op": name, "T": t, "H": h, "D": d, "chunk": chunk, "dtype": jnp.dtype(dtype).name,
        "compile_s": round(seconds, 1),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "chunk_states_bytes": n_chunks * h * d * d * 4,
        "per_token_states_bytes": t * h * d * d * 4,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, default=32768)
    parser.add_argument("--h", type=int, default=16)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--ops", default="gdr,ssd", help="comma list of gdr, ssd")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    cases = {"gdr": ("gated_delta_rule chunk", _gdr_case, 64), "ssd": ("ssd chunk", _ssd_case, 256)}
    rows = []
    for key in args.ops.split(","):
        name, make, chunk = cases[key]
        rows.append(analyse(name, make, args.t, args.h, args.d, chunk, jnp.bfloat16))
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; fwd+bwd, grad of sum(out) wrt every input")
    mib = lambda b: f"{b / 2**20:10.1f}"  # noqa: E731
    print(f"{'op':24s} {'T':>6s} {'chunk':>5s} {'temp MiB':>10s} {'args MiB':>10s} {'out MiB':>10s} "
          f"{'chunk-states MiB':>16s} {'per-token-states MiB':>20s} {'compile s':>9s}")
    for r in rows:
        print(f"{r['op']:24s} {r['T']:6d} {r['chunk']:5d} {mib(r['temp_bytes'])} {mib(r['argument_bytes'])} "
              f"{mib(r['output_bytes'])} {mib(r['chunk_states_bytes']):>16s} {mib(r['per_token_states_bytes']):>20s} "
              f"{r['compile_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
