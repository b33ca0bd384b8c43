"""One distillation train step at Qwen2.5-3B shapes (random bf16 weights) on one GPU: tokens/s, MFU and peak memory.

Runs exactly what `python -m ahn_jax.train` runs per micro-step (ahn_jax.training.step.make_train_step): teacher forward
(full attention, no gradient), student forward (window + sinks + Gated DeltaNet memory, traced window/sinks), KL in
float32 chunked over the sequence, backward through the frozen base into the memory, AdamW update of the memory.

MFU counts 6N FLOPs per token (teacher fwd 2N + student fwd 2N + activation bwd 2N, ../shared/PERF.md), N = base
parameters, against the H100's 989 TFLOP/s dense bf16 datasheet peak (and the ~790 TFLOP/s measured matmul ceiling).

    PYTHONPATH=$PWD python3 benchmarks/bench_train_step.py [--seq 24576] [--layers 36] [--window 4096 --sinks 128]
        [--batch 1] [--fsdp 1] [--data 1] [--static-window]
With --fsdp/--data > 1 the frozen weights and the memory are sharded exactly as `python -m ahn_jax.train` shards them
(ahn_jax.sharding: embed dims over fsdp, the batch over (data, fsdp)); the batch must divide over data*fsdp. The batch
is seeded, so runs on different device counts see the same tokens and their losses can be compared.
Prints a table last and writes JSON to $OUT (if set; --tag names the file).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ahn_jax import compat, sharding
from ahn_jax.models.config import QwenConfig
from ahn_jax.models.hybrid import HybridQwenForCausalLM
from ahn_jax.models.hybrid_config import AHNConfig
from ahn_jax.models.qwen import QwenForCausalLM
from ahn_jax.training.optim import make_optimizer
from ahn_jax.training.step import StepOptions, make_train_step, split_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEAK_DATASHEET = 989e12
PEAK_MEASURED = 790e12


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=24576)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (default: all 36)")
    p.add_argument("--memory", default="gated_deltanet")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--sinks", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--static-window", action="store_true",
                   help="bake window/sinks into the step (config window.static): static-window attention kernels")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (global)")
    p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp size (weights sharded over it)")
    p.add_argument("--data", type=int, default=1, help="mesh data size")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = p.parse_args()
    n_dev = args.fsdp * args.data
    if n_dev > jax.device_count():
        p.error(f"--fsdp {args.fsdp} x --data {args.data} needs {n_dev} devices, have {jax.device_count()}")
    if args.batch % n_dev:
        p.error(f"--batch {args.batch} does not divide over data*fsdp = {n_dev} devices")
    mesh = sharding.make_mesh(args.data, args.fsdp, 1, devices=jax.devices()[:n_dev])

    cfg = json.loads((ROOT / "tests/models/configs/Qwen2.5-3B-Instruct.json").read_text())
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    config = QwenConfig.from_hf(cfg)
    t0 = time.perf_counter()
    base = QwenForCausalLM(config, dtype="bfloat16", rngs=nnx.Rngs(0))
    ahn = AHNConfig(memory=args.memory, window=args.window, sinks=args.sinks, max_window=8192, max_sinks=4096)
    model = HybridQwenForCausalLM(base, ahn, rngs=nnx.Rngs(1))
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.base, nnx.Param)))
    graphdef, mem, frozen = split_model(model)
    del model, base
    n_mem = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mem))
    print(f"built in {time.perf_counter() - t0:.1f}s: base {n_base:,} params, memory {n_mem:,}", flush=True)

    with compat.set_mesh(mesh):
        mem = jax.device_put(mem, sharding.shard_params(mem, mesh))
        frozen = jax.device_put(frozen, sharding.shard_params(frozen, mesh))
    tx = make_optimizer(mem, lr=1e-4, steps=740)
    opt_state = tx.init(mem)
    step = make_train_step(graphdef, tx, StepOptions(remat=True),
                           static_window=(args.window, args.sinks) if args.static_window else None)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 151_000, size=(args.batch, args.seq)), jnp.int32),
             "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32)}
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    w, s = jnp.int32(args.window), jnp.int32(args.sinks)

    t0 = time.perf_counter()
    with compat.set_mesh(mesh):
        compiled = step.lower(mem, opt_state, frozen, batch, w, s).compile()
    compile_s = time.perf_counter() - t0
    mem_sh, opt_sh = compiled.input_shardings[0][:2]  # what the AOT-compiled step expects for the memory and optimizer
    mem, opt_state = jax.device_put((mem, opt_state), (mem_sh, opt_sh))
    ma = compiled.memory_analysis()
    print(f"compiled in {compile_s:.1f}s; temp {getattr(ma, 'temp_size_in_bytes', 0) / 2**30:.2f} GiB", flush=True)

    times, losses = [], []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        mem, opt_state, metrics = compiled(mem, opt_state, frozen, batch, w, s)
        # The compiled step returns the updated memory/optimizer state replicated; put them back in their (fsdp)
        # shardings, as the AOT-compiled step requires (a local slice: no communication).
        mem, opt_state = jax.device_put((mem, opt_state), (mem_sh, opt_sh))
        loss = float(metrics["loss"])  # blocks until the step is done
        dt = time.perf_counter() - t0
        if not np.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss} at step {i}")
        losses.append(loss)
        if i:  # the first call also transfers/initialises: warm-up
            times.append(dt)
        print(f"step {i}: {dt * 1e3:.0f} ms, loss {loss:.4g}", flush=True)
    med = statistics.median(times)
    tok_s = args.batch * args.seq / med
    flops = 6.0 * n_base * tok_s / n_dev  # per device
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat) / 2**30
    row = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq": args.seq, "batch": args.batch,
           "devices": n_dev, "fsdp": args.fsdp, "data": args.data, "tokens_per_s_per_device": tok_s / n_dev,
           "static_window": args.static_window,
           "layers": config.num_hidden_layers, "memory": args.memory, "window": args.window, "sinks": args.sinks,
           "step_ms": med * 1e3, "tokens_per_s": tok_s, "mfu_datasheet": flops / PEAK_DATASHEET,
           "mfu_measured_peak": flops / PEAK_MEASURED, "peak_gib": peak, "compile_s": compile_s,
           "temp_gib": getattr(ma, "temp_size_in_bytes", 0) / 2**30, "losses": losses}
    if os.environ.get("OUT"):
        name = "bench_train_step" + ("_static" if args.static_window else "") + (f"_{args.tag}" if args.tag else "")
        name += ".json"
        pathlib.Path(os.environ["OUT"], name).write_text(json.dumps(row, indent=2))
    print("\n| device | GPUs (data x fsdp) | window | B x T | layers | step ms | tokens/s | tokens/s/GPU | MFU (989) "
          "| MFU (790) | peak GiB/GPU | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['device']} | {n_dev} ({args.data} x {args.fsdp}) | {'static' if args.static_window else 'traced'} | "
          f"{args.batch} x {args.seq} | {row['layers']} | {row['step_ms']:.0f} | {tok_s:.0f} | {tok_s / n_dev:.0f} | "
          f"{row['mfu_datasheet']:.1%} | {row['mfu_measured_peak']:.1%} | {peak:.1f} | {compile_s:.0f} |")


if __name__ == "__main__":
    main()
