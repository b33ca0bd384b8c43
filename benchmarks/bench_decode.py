"""Decode tokens/s and prefill peak memory: the hybrid (fixed-size cache) vs the same model with a full KV cache.

Qwen2.5-3B shapes (hidden 2048, 36 layers, 16 q heads, 2 KV heads, head_dim 128, vocab 151936, tied), random bf16
weights, a gated_deltanet memory with non-zero output projection. For each context length and batch size:
  - the cache is FILLED WITH RANDOM KV / gates / memory state standing for a context of that length (running a real
    prefill at every length and batch would take far longer and gives the same decode cost: the cache shapes and the
    work per token do not depend on the values), then `--steps` decode steps are timed after 2 warm-up steps;
  - hybrid: sinks S + ring of W tokens (default S=128, W=32640: the paper's 32k setting); full: a KV buffer of
    context + steps tokens. Configurations whose full cache cannot fit are reported as skipped (estimated bytes).
Peak memory of ONE real 128k-token prefill (batch 1, chunked) is measured with the device's memory stats, for the
hybrid and (unless --skip-full-prefill) the full-attention model.

Usage (GPU): python benchmarks/bench_decode.py [--contexts 8192,32768,131072] [--batches 1,32] [--window 32640]
             [--sinks 128] [--steps 20] [--prefill-length 131072] [--prefill-chunk 2048]
Writes $OUT/bench_decode.json (or ./bench_decode.json) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

QWEN25_3B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151936,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True}


def build_model(window, sinks, layers=None):
    from flax import nnx

    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.hybrid import HybridQwenForCausalLM
    from ahn_jax.models.hybrid_config import AHNConfig
    from ahn_jax.models.memory.base import MemoryParam
    from ahn_jax.models.qwen import QwenForCausalLM

    cfg = dict(QWEN25_3B, num_hidden_layers=layers or QWEN25_3B["num_hidden_layers"])
    base = QwenForCausalLM(QwenConfig.from_hf(cfg), dtype="bfloat16", rngs=nnx.Rngs(0))
    model = HybridQwenForCausalLM(base, AHNConfig(memory="gated_deltanet", window=window, sinks=sinks),
                                  rngs=nnx.Rngs(1))
    leaves, treedef = jax.tree.flatten(nnx.state(model, MemoryParam))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))
    return model


def random_cache(dec, batch, context, steps, key):
    """A cache as if `context` tokens had been consumed, with random contents (see the module docstring)."""
    from ahn_jax.inference.cache import InferenceCache

    max_length = context + steps if dec.teacher else None
    cache: InferenceCache = dec.init_cache(batch, max_length)
    leaves, treedef = jax.tree.flatten(cache.layers)
    keys = jax.random.split(key, len(leaves))
    filled = []
    for x, k in zip(leaves, keys):
        if jnp.issubdtype(x.dtype, jnp.floating):
            filled.append((0.1 * jax.random.uniform(k, x.shape, jnp.float32)).astype(x.dtype))
        else:
            filled.append(x)
    slots = jnp.arange(cache.ring_size)
    if dec.teacher:
        ring_pos = jnp.where(slots < context, slots, -1)
    else:
        w, s = cache.window, cache.sinks
        start = context - w
        ring_pos = start + (slots + s - start) % w
    ring_pos = jnp.broadcast_to(ring_pos.astype(jnp.int32), (batch, cache.ring_size))
    return cache.replace(layers=jax.tree.unflatten(treedef, filled), ring_pos=ring_pos,
                         lengths=jnp.full((batch,), context, jnp.int32))


def cache_bytes_estimate(dec, batch, context, steps):
    from ahn_jax.inference.cache import cache_nbytes

    return cache_nbytes(jax.eval_shape(lambda: dec.init_cache(batch, context + steps if dec.teacher else None)))


def time_decode(dec, cache, steps):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, size=(cache.batch,)), jnp.int32)
    for _ in range(2):  # compile + warm-up
        logits, cache = dec.decode(tokens, cache)
    logits.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = dec.decode(tokens, cache)
    logits.block_until_ready()
    return (time.perf_counter() - start) / steps


def peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure_prefill(dec, length, chunk):
    ids = np.random.default_rng(1).integers(0, 1000, size=(1, length)).astype(np.int32)
    before = peak_bytes()
    start = time.perf_counter()
    logits, cache = dec.prefill(ids, chunk=chunk, max_length=length + 1 if dec.teacher else None)
    logits.block_until_ready()
    seconds = time.perf_counter() - start
    out = {"length": length, "chunk": chunk, "seconds_incl_compile": seconds, "peak_bytes": peak_bytes(),
           "peak_bytes_before": before}
    del logits, cache
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--window", type=int, default=32640)
    p.add_argument("--sinks", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=None, help="fewer layers for a quick smoke run")
    p.add_argument("--prefill-length", type=int, default=131072, help="0 = skip the prefill measurement")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--skip-full-prefill", action="store_true")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="skip a configuration whose cache estimate exceeds this (default: 85%% of device memory)")
    args = p.parse_args(argv)

    from ahn_jax.inference.decode import Decoder

    device = jax.devices()[0]
    limit = args.memory_limit_gb * 2 ** 30 if args.memory_limit_gb else \
        0.85 * (device.memory_stats() or {}).get("bytes_limit", 80 * 2 ** 30)
    model = build_model(args.window, args.sinks, args.layers)
    hybrid, full = Decoder(model), Decoder(model, teacher=True)
    weights = (device.memory_stats() or {}).get("bytes_in_use")
    result = {"device": str(device), "jax": jax.__version__, "shapes": "Qwen2.5-3B", "layers": args.layers or 36,
              "window": args.window, "sinks": args.sinks, "steps": args.steps, "weights_bytes_in_use": weights,
              "decode_cache": "random contents standing for the context (no prefill)", "prefill": {}, "decode": []}

    if args.prefill_length:
        result["prefill"]["hybrid"] = measure_prefill(hybrid, args.prefill_length, args.prefill_chunk)
        print("prefill hybrid", result["prefill"]["hybrid"], flush=True)
        if not args.skip_full_prefill:
            try:
                result["prefill"]["full"] = measure_prefill(full, args.prefill_length, args.prefill_chunk)
            except Exception as e:  # noqa: BLE001 - an OOM is a result here
                result["prefill"]["full"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print("prefill full", result["prefill"]["full"], flush=True)

    key = jax.random.key(0)
    for context in [int(c) for c in args.contexts.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            for name, dec in (("hybrid", hybrid), ("full", full)):
                row = {"kind": name, "context": context, "batch": batch,
                       "cache_bytes": cache_bytes_estimate(dec, batch, context, args.steps + 2)}
                if row["cache_bytes"] > limit:
                    row["skipped"] = f"cache {row['cache_bytes'] / 2 ** 30:.1f} GiB > limit {limit / 2 ** 30:.1f} GiB"
                else:
                    try:
                        cache = random_cache(dec, batch, context, args.steps + 2, key)
                        sec = time_decode(dec, cache, args.steps)
                        del cache
                        row.update(ms_per_step=1e3 * sec, tokens_per_s=batch / sec)
                    except Exception as e:  # noqa: BLE001 - an OOM is a result here
                        row["skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(row, flush=True)
                result["decode"].append(row)

    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "bench_decode.json"), "w") as f:
        json.dump(result, f, indent=2)
    gib = 2 ** 30
    print(f"\n{device} | Qwen2.5-3B shapes, {result['layers']} layers, bf16 random weights | hybrid S={args.sinks} "
          f"W={args.window} gated_deltanet | decode caches filled with random values")
    print(f"{'kind':8} {'context':>8} {'batch':>5} {'cache GiB':>10} {'ms/step':>9} {'tok/s':>9}")
    for r in result["decode"]:
        tail = f"{r['ms_per_step']:9.2f} {r['tokens_per_s']:9.1f}" if "tokens_per_s" in r else f"  skipped: {r['skipped'][:60]}"
        print(f"{r['kind']:8} {r['context']:8d} {r['batch']:5d} {r['cache_bytes'] / gib:10.2f} {tail}")
    for name, r in result["prefill"].items():
        if "peak_bytes" in r and r["peak_bytes"] is not None:
            print(f"prefill {name}: {r['length']} tokens, chunk {r['chunk']}: peak {r['peak_bytes'] / gib:.2f} GiB "
                  f"(weights {(weights or 0) / gib:.2f} GiB), {r['seconds_incl_compile']:.1f} s incl. compile")
        else:
            print(f"prefill {name}: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
