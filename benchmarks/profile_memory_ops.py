"""Where the memories' forward+backward time goes on the GPU: a jax.profiler trace of a few forward+backward calls
of the gated delta rule and of the Mamba2 SSD op (B1 T32768 H16, D = P = N = 128, bf16), summarised per kernel by
trace_summary.py (count and ms per call, the GPU stream's busy fraction). For planning kernel work, not a benchmark
table: bench_delta_rule.py and bench_ssd.py time and check the ops.

  PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/profile_memory_ops.py [--calls 3] [--t 32768]

JSON to $OUT/profile_memory_ops.json, a short table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from bench_delta_rule import device_inputs, make_inputs as delta_inputs, ours_fns
from bench_ssd import make_inputs as ssd_inputs, op_fns, timing_inputs
from trace_summary import summarize_dir


def profile(fn, args, calls):
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        return summarize_dir(tmp, steps=calls, top=12)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="forward+backward calls inside the trace")
    parser.add_argument("--t", type=int, default=32768, help="sequence length")
    opts = parser.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "t": opts.t}

    q, k, v, g, beta, cot = device_inputs(delta_inputs(1, opts.t, 16, 128), gated=True)
    report["gated_delta_rule_fwd_bwd"] = profile(ours_fns(128, True)[1], (q, k, v, g, beta, cot), opts.calls)

    args, cots = timing_inputs(ssd_inputs(1, opts.t, 16, 128, 128))
    report["ssd_fwd_bwd"] = profile(op_fns("pallas")[1], args + cots, opts.calls)

    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile_memory_ops.json"), "w") as f:
        json.dump(report, f, indent=1)
    for op in ("gated_delta_rule_fwd_bwd", "ssd_fwd_bwd"):
        for stream, s in report[op].items():
            if s["event_ms_per_step"] < 0.05:
                continue
            print(f"\n{op} | {stream}: busy {s['busy_ms_per_step']:.3f} ms per call, span {s['span_ms_per_step']:.3f}")
            for name, count, ms in s["top"]:
                print(f"  {ms:8.3f} ms  x{count:g}  {name}")


if __name__ == "__main__":
    main()
