"""Batch-1 decode projections on the GPU: how XLA compiles x [1, in] @ W [in, out] (bf16) and what it costs.

XLA's GPU pipeline strength-reduces a matrix-vector dot whose matrix has fewer than 10^7 elements into multiply +
reduce (DotStrengthReduction); on the H100 the profile of a Qwen2.5-3B decode step showed o_proj (2048 x 2048) as such
a reduction at ~0.3 TB/s. This script times 36 chained projections (distinct weights, so nothing stays in L2) in
several spellings and reports, per spelling, ms per projection, effective TB/s and whether the optimised HLO holds a
gemm fusion or a reduce. Each spelling is checked against the plain dot first (bf16 outputs, max |diff| <= 2e-2 rel).

Usage (GPU): python benchmarks/bench_matvec.py [--shapes 2048x2048,2048x256,2048x11008] [--layers 36]
Writes $OUT/bench_matvec.json (or ./) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import time_jax  # noqa: E402


def plain(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(w.dtype)


def two_rows_zeros(x, w):
    x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    return jnp.dot(x2, w, preferred_element_type=jnp.float32)[:1].astype(w.dtype)


def two_rows_repeat(x, w):
    x2 = jnp.concatenate([x, x], axis=0)
    return jnp.dot(x2, w, preferred_element_type=jnp.float32)[:1].astype(w.dtype)


def eight_rows_zeros(x, w):
    x2 = jnp.pad(x, ((0, 7), (0, 0)))
    return jnp.dot(x2, w, preferred_element_type=jnp.float32)[:1].astype(w.dtype)


def transposed(x, w_t):  # W stored [out, in] (HF's layout): y = W x
    return jnp.dot(w_t, x[0], preferred_element_type=jnp.float32)[None].astype(w_t.dtype)


SPELLINGS = {"plain": plain, "two_rows_zeros": two_rows_zeros, "two_rows_repeat": two_rows_repeat,
             "eight_rows_zeros": eight_rows_zeros, "transposed_weight": transposed}


def chain(fn, x, ws):
    """36 projections; each output feeds the next input (sliced/tiled to the input width) so none is dead code."""
    d_in = x.shape[-1]
    outs = []
    for w in ws:
        y = fn(x, w)
        outs.append(y)
        x = jnp.resize(y, (1, d_in)).astype(x.dtype) * 0.5 + x * 0.5
    return x, outs[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2048x2048,2048x256,2048x11008,11008x2048")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--smoke", action="store_true", help="small shapes, 3 layers (CPU check of the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.layers = "64x64,64x16", 3
    out_dir = os.environ.get("OUT", ".")
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "layers": args.layers, "rows": []}
    for shape in args.shapes.split(","):
        d_in, d_out = (int(n) for n in shape.split("x"))
        key = jax.random.key(d_in + d_out)
        ws = [(0.02 * jax.random.normal(k, (d_in, d_out), jnp.float32)).astype(jnp.bfloat16)
              for k in jax.random.split(key, args.layers)]
        ws_t = [w.T.copy() for w in ws]
        x = jax.random.normal(jax.random.key(1), (1, d_in), jnp.float32).astype(jnp.bfloat16)
        ref = None
        for name, fn in SPELLINGS.items():
            weights = ws_t if name == "transposed_weight" else ws
            f = jax.jit(lambda x, ws, fn=fn: chain(fn, x, ws))
            hlo = f.lower(x, weights).compile().as_text()
            out = np.asarray(f(x, weights)[1], np.float32)
            ref = out if ref is None else ref
            err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
            sec = time_jax(f, x, weights) / 1e3  # time_jax gives milliseconds
            row = {"shape": shape, "spelling": name, "ms_per_projection": 1e3 * sec / args.layers,
                   "tb_per_s": args.layers * d_in * d_out * 2 / sec / 1e12, "rel_err_vs_plain": err,
                   "hlo_gemm_fusions": hlo.count("kind=kCustom, calls=%gemm_fusion"),
                   "hlo_reduce_fusions": sum(1 for line in hlo.splitlines() if " reduce(" in line)}
            print(row, flush=True)
            result["rows"].append(row)
            with open(os.path.join(out_dir, "bench_matvec.json"), "w") as fh:
                json.dump(result, fh, indent=2)
    print(f"\n{'shape':<12}{'spelling':<20}{'ms/proj':>9}{'TB/s':>7}{'gemm':>6}{'reduce':>7}{'err':>9}")
    for r in result["rows"]:
        print(f"{r['shape']:<12}{r['spelling']:<20}{r['ms_per_projection']:>9.4f}{r['tb_per_s']:>7.2f}"
              f"{r['hlo_gemm_fusions']:>6}{r['hlo_reduce_fusions']:>7}{r['rel_err_vs_plain']:>9.1e}")
    return result


if __name__ == "__main__":
    main()
