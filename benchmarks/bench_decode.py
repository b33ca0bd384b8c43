"""Decode tokens/s and prefill peak memory: the hybrid (fixed-size cache) vs the same model with a full KV cache.

Qwen2.5-3B shapes (hidden 2048, 36 layers, 16 q heads, 2 KV heads, head_dim 128, vocab 151936, tied), random bf16
weights, a gated_deltanet memory with non-zero output projection. For each context length and batch size:
  - the cache is FILLED WITH RANDOM KV / gates / memory state standing for a context of that length (running a real
    prefill at every length and batch would take far longer and gives the same decode cost: the cache shapes and the
    work per token do not depend on the values), then `--steps` decode steps are timed after 2 warm-up steps;
  - hybrid: sinks S + ring of W + 1 tokens (default S=128 and W=32640, the paper's 32k setting, then W=8192); full:
    a KV buffer of context + timed steps tokens, the same copy-free decode step (ahn_jax.inference.decode). Rows whose
    cache estimate exceeds 85% of device memory are reported as skipped with the estimate (full KV at 128k x 32:
    ~154 GB). Timings: median of --repeats loops of --steps pipelined steps (Decoder.step: no host sync per token).
  - floor: (weights + cache bytes) / --bandwidth-tbs, what a step must at least read.
Peak memory of real prefills (batch 1, chunked; attention in query tiles, decode.PREFILL_QUERY_TILE): the hybrid at
--prefill-length / 4, / 2 and itself (a constant peak shows it does not grow with the prompt), then (unless
--skip-full-prefill) the full-attention model at --prefill-length; each with the device's running peak, the peak above
the weights, and XLA's compiled plan for one chunk step.

--profile: at the hybrid (first window, largest context, --profile-batch) and at the full-KV model (same point) a
jax.profiler trace of 5 steps, summarised per GPU stream (trace_summary.py: kernels per step, busy fraction, costliest
kernels; --keep-trace also copies the raw trace to $OUT), the time per token of Decoder.greedy (--greedy-steps tokens
per dispatch: what is left when the host's per-call work is amortised), the hybrid's step time split into attention-only (every layer's sink + ring blocks) and
the rest, and the number of ring-sized copies in the compiled donated step (0 = in place; on CPU, bf16 buffers are
updated through float32 and show up as copies, so only the GPU count means anything).

Each row also times Decoder.greedy (--greedy-steps tokens per compiled loop; off with --no-greedy-rows): the per-token
cost without the host's per-call work, which dominates a batch-1 hybrid step on the H100 (RESULTS.md).

--fused-memory: every hybrid row is timed twice, with the memory's decode step in XLA (kind "hybrid") and as the fused
Pallas kernel (kind "hybrid_fused", decode.FUSED_MEMORY_DECODE; pallas_kernels/memory_decode.py). Before the rows of a
window, one step from the same random cache (evicting) with and without the kernel is compared (logits, every
layer's memory state: "fused_check" in the JSON); with --profile the fused hybrid is profiled too ("profile_fused").

Usage (GPU): python benchmarks/bench_decode.py [--contexts 8192,32768,131072] [--batches 1,32] [--windows 32640,8192]
             [--sinks 128] [--steps 20] [--repeats 3] [--prefill-length 131072] [--prefill-chunk 2048] [--profile]
CPU check: python benchmarks/bench_decode.py --smoke --profile
Writes $OUT/bench_decode.json (or ./bench_decode.json; rewritten after every row, so a cut-off run keeps its rows)
and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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


SMOKE_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 16, "num_key_value_heads": 2,
              "head_dim": 8, "vocab_size": 512}


def build_base(layers=None, smoke=False, dtype="bfloat16"):
    from flax import nnx

    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.qwen import QwenForCausalLM

    cfg = dict(QWEN25_3B, num_hidden_layers=layers or QWEN25_3B["num_hidden_layers"], **(SMOKE_DIMS if smoke else {}))
    return QwenForCausalLM(QwenConfig.from_hf(cfg), dtype=dtype, rngs=nnx.Rngs(0))


def build_hybrid(base, window, sinks):
    """The hybrid around `base` (its weight arrays are shared, not copied: one set of weights on the device)."""
    from flax import nnx

    from ahn_jax.models.hybrid import HybridQwenForCausalLM
    from ahn_jax.models.hybrid_config import AHNConfig
    from ahn_jax.models.memory.base import MemoryParam

    model = HybridQwenForCausalLM(base, AHNConfig(memory="gated_deltanet", window=window, sinks=sinks),
                                  rngs=nnx.Rngs(1))
    leaves, treedef = jax.tree.flatten(nnx.state(model, MemoryParam))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))
    return model


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_leaf(key, shape, dtype):
    """One cache leaf of random values (compiled once per shape and dtype, not once per leaf)."""
    if jnp.issubdtype(dtype, jnp.floating):
        return (0.1 * jax.random.uniform(key, shape, jnp.float32)).astype(dtype)
    return jnp.zeros(shape, dtype)


def random_cache(dec, batch, context, steps, key):
    """A cache as if `context` tokens had been consumed, with random contents (see the module docstring). Built one
    leaf at a time from the cache's shapes, so the peak is the cache plus one leaf (an all-zeros cache filled
    afterwards would hold it twice: at batch 32 that does not fit)."""
    from ahn_jax.inference.cache import InferenceCache

    max_length = context + steps if dec.teacher else None
    shapes: InferenceCache = jax.eval_shape(lambda: dec.init_cache(batch, max_length))
    leaves, treedef = jax.tree.flatten(shapes.layers)
    filled = [_random_leaf(k, sd.shape, jnp.dtype(sd.dtype))
              for sd, k in zip(leaves, jax.random.split(key, len(leaves)))]
    r, s = shapes.ring_size, shapes.sinks
    slots = jnp.arange(r)
    if dec.teacher:
        ring_pos = jnp.where(slots < context, slots, -1)
    else:  # the latest position p < context with (p - S) % R == slot (-1 if none is >= S)
        ring_pos = (context - 1) - ((context - 1 - s - slots) % r)
        ring_pos = jnp.where(ring_pos >= s, ring_pos, -1)
    ring_pos = jnp.broadcast_to(ring_pos.astype(jnp.int32), (batch, r))
    return shapes.replace(layers=jax.tree.unflatten(treedef, filled), ring_pos=ring_pos,
                          lengths=jnp.full((batch,), context, jnp.int32), sinks_full=context >= s)


def cache_bytes_estimate(dec, batch, context, steps):
    from ahn_jax.inference.cache import cache_nbytes

    return cache_nbytes(jax.eval_shape(lambda: dec.init_cache(batch, context + steps if dec.teacher else None)))


# --donate-logits: time a step that also donates the previous step's logits buffer, so the new logits land at the same
# address. Hypothesis (from the H100 profiles): XLA re-records the step's whole CUDA graph on the host whenever a buffer
# the graph touches moved since the last call (hybrid: 6.4 ms per call); the logits output is a fresh allocation every
# call (the token array here is the same one each call and the cache is donated). If that is what moves, donating
# the logits removes the re-recording and the batch-1 step drops to its GPU time.
DONATE_LOGITS = False


@functools.lru_cache(maxsize=None)
def _donating_step(dec, fused_memory):
    """Keyed by the memory-path switch too: the --fused-memory rows flip it, and a jit cached per decoder alone would
    keep the first trace."""
    from ahn_jax.inference import decode as decode_module

    def step(leaves, cache, ids, logits_buffer):
        del logits_buffer  # donated only for its memory: jax aliases it to the logits output (same shape and dtype)
        return dec._fn(leaves, cache, ids, None, decoding=True, first_valid=0, all_logits=False,
                       q_tile=decode_module.PREFILL_QUERY_TILE, fused_memory=fused_memory,
                       attention_kernel=decode_module.decode_attention_kernel_enabled())

    return jax.jit(step, donate_argnums=() if jax.default_backend() == "cpu" else (1, 3))


def stepper(dec, cache, tokens):
    """-> (one, logits): one(logits, cache) -> (logits, cache) runs a decode step on `tokens` (Decoder.step, or with
    DONATE_LOGITS the step that reuses the logits buffer it is given); logits: the buffer for the first call."""
    if not DONATE_LOGITS:
        return (lambda logits, cache: dec.step(tokens, cache)), None
    from ahn_jax.inference import decode as decode_module

    donating = _donating_step(dec, decode_module._fused_memory_static())
    logits = jnp.zeros(jax.eval_shape(lambda c: dec.step(tokens, c), cache)[0].shape, jnp.float32)
    return (lambda logits, cache: donating(dec._leaves, cache, tokens, logits)), logits


def time_decode(dec, cache, steps, repeats):
    """Median over `repeats` loops of `steps` pipelined decode steps (Decoder.step: no host sync inside the loop),
    after 2 warm-up steps (the first compiles). -> (seconds per step, cache)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, size=(cache.batch, 1)), jnp.int32)
    one, logits = stepper(dec, cache, tokens)
    for _ in range(2):
        logits, cache = one(logits, cache)
    logits.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            logits, cache = one(logits, cache)
        logits.block_until_ready()
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times)), cache


def time_greedy(dec, cache, steps, repeats=3):
    """Seconds per token of Decoder.greedy: `steps` greedy tokens in one compiled device loop (one dispatch per
    `steps` tokens), median of `repeats` calls after a compiling call. -> (seconds per token, cache)."""
    tokens = jnp.zeros((cache.batch, 1), jnp.int32)
    out, cache = dec.greedy(tokens, cache, steps)
    out.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, cache = dec.greedy(tokens, cache, steps)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times)), cache


def peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_prefill_bytes(dec, length, chunk):
    """What XLA plans for one prefill chunk step, from the compiled step's memory analysis (independent of what the
    process did before, unlike the device's running peak): arguments (weights + cache + ids) + outputs + temporaries
    - donated/aliased bytes. -> dict of byte counts, or {} where the backend gives no analysis."""
    from ahn_jax.inference.decode import PREFILL_QUERY_TILE

    cache = jax.eval_shape(lambda: dec.init_cache(1, length + 1 if dec.teacher else None))
    ids = jax.ShapeDtypeStruct((1, min(chunk, length)), jnp.int32)
    compiled = dec._fn.lower(dec._leaves, cache, ids, None, decoding=False, first_valid=0, all_logits=False,
                             q_tile=PREFILL_QUERY_TILE).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {k: int(getattr(ma, k + "_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")}
    out["step_total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def measure_prefill(dec, length, chunk, weight_bytes):
    """One real prefill of `length` random tokens (batch 1). peak_bytes is the device's running peak (it never goes
    down, so measure in increasing order of expected peak); compiled_* is XLA's plan for one chunk step."""
    from ahn_jax.inference.cache import cache_nbytes

    ids = np.random.default_rng(1).integers(0, 500, size=(1, length)).astype(np.int32)
    before = peak_bytes()
    start = time.perf_counter()
    logits, cache = dec.prefill(ids, chunk=chunk, max_length=length + 1 if dec.teacher else None)
    logits.block_until_ready()
    seconds = time.perf_counter() - start
    out = {"length": length, "chunk": chunk, "seconds_incl_compile": seconds, "peak_bytes": peak_bytes(),
           "peak_bytes_before": before, "weights_bytes": weight_bytes, "cache_bytes": cache_nbytes(cache),
           "compiled_chunk_step": compiled_prefill_bytes(dec, length, chunk)}
    if out["peak_bytes"] is not None:
        out["peak_above_weights_bytes"] = out["peak_bytes"] - weight_bytes
    del logits, cache
    return out


def attention_only_seconds(dec, cache, steps):
    """Device time of the decode attention alone (every layer's sink + ring blocks, random queries): the part of a
    step that reads the KV cache. Same block_attention call as the decode step."""
    from ahn_jax.inference.decode import block_attention

    c = dec.base.config
    q = jax.random.normal(jax.random.key(5), (cache.batch, 1, c.num_attention_heads, c.head_dim), jnp.bfloat16)
    q_pos = cache.lengths[:, None] - 1
    sink_pos = jnp.broadcast_to(jnp.arange(cache.sinks, dtype=jnp.int32), (cache.batch, cache.sinks))

    @jax.jit
    def attend_all(q, layers, ring_pos, lengths):
        outs = [block_attention(q, [(lc.sink_k, lc.sink_v, sink_pos, sink_pos < lengths[:, None]),
                                    (lc.ring_k, lc.ring_v, ring_pos, ring_pos >= 0)], q_pos, window=cache.window,
                                sinks=cache.sinks) for lc in layers]
        return sum(o.astype(jnp.float32).sum() for o in outs)

    kv = [lc._replace(gates=None, memory=None) for lc in cache.layers]
    attend_all(q, kv, cache.ring_pos, cache.lengths).block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        out = attend_all(q, kv, cache.ring_pos, cache.lengths)
    out.block_until_ready()
    return (time.perf_counter() - start) / steps


def compiled_step_text(dec, cache, fused=None):
    """The optimised HLO of the compiled, donated decode step; fused: the memory kernel on/off (None: the library's
    setting; on uses decode.FUSED_MEMORY_BLOCK_V / FUSED_MEMORY_COLUMNS as the step itself does)."""
    from ahn_jax.inference import decode as decode_module

    if fused is None:
        fused = decode_module._fused_memory_static()
    elif fused:
        fused = ("fused", decode_module.FUSED_MEMORY_BLOCK_V, decode_module.FUSED_MEMORY_COLUMNS)
    fn = jax.jit(decode_module._forward, static_argnums=(0,),
                 static_argnames=("decoding", "first_valid", "all_logits", "fused_memory", "attention_kernel"),
                 donate_argnums=(2,))
    ids = jnp.zeros((cache.batch, 1), jnp.int32)
    return fn.lower(dec.graphdef, dec.state, cache, ids, None, decoding=True, first_valid=0, all_logits=False,
                    fused_memory=fused,
                    attention_kernel=decode_module.decode_attention_kernel_enabled()).compile().as_text()


def save_step_hlo(dec, cache, out_dir, tag, fused=None):
    """Write the decode step's optimised HLO (to look up the fusions a profile names) to out_dir; -> the path."""
    path = os.path.join(out_dir, f"decode_step_{tag}.hlo.txt")
    with open(path, "w") as f:
        f.write(compiled_step_text(dec, cache, fused))
    return path


def ring_copies(dec, cache, fused=None):
    """Copies of a ring-shaped buffer in the compiled, donated decode step (0 = every cache buffer updated in place)."""
    text = compiled_step_text(dec, cache, fused)
    ring = ",".join(map(str, cache.layers[0].ring_k.shape))
    return sum(1 for line in text.splitlines()
               if ("copy(" in line or "copy-start(" in line) and f"[{ring}]" in line.split("=", 1)[-1][:60])


@contextlib.contextmanager
def decode_switch(name, on):
    """decode.<name> set to `on` inside the block (the switches are static arguments of the jitted step: both
    variants stay compiled side by side); None leaves the library's setting."""
    from ahn_jax.inference import decode as decode_module

    if on is None:
        yield
        return
    old = getattr(decode_module, name)
    setattr(decode_module, name, on)
    try:
        yield
    finally:
        setattr(decode_module, name, old)


def attention_kernel(on):
    """decode.DECODE_ATTENTION_KERNEL set to `on` inside the block (None: the library's setting)."""
    return decode_switch("DECODE_ATTENTION_KERNEL", on)


def check_attention_kernel(batch, ring, sinks, hq=16, hkv=2, d=128, window=None):
    """The decode-attention kernel vs the XLA block attention on cache-shaped random blocks (a sink block of `sinks`
    keys and a ring of `ring`, some slots empty), one query per sequence near the end: relative max error in float32
    (highest-precision XLA dots) and bf16. -> dict with ok."""
    from ahn_jax.inference.decode import block_attention

    window = ring - 1 if window is None else window
    out = {"batch": batch, "ring": ring, "sinks": sinks}
    ks = jax.random.split(jax.random.key(5), 5)
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        q = jax.random.normal(ks[0], (batch, 1, hq, d), jnp.float32).astype(dtype)
        blocks = []
        for i, (n, start) in enumerate(((sinks, 0), (ring, sinks))):
            k = jax.random.normal(ks[1 + 2 * i], (batch, hkv, n, d), jnp.float32).astype(dtype)
            v = jax.random.normal(ks[2 + 2 * i], (batch, hkv, n, d), jnp.float32).astype(dtype)
            pos = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (batch, n))
            pos = jnp.where(jnp.arange(n) % 97 == 5, -1, pos)  # a few empty slots
            blocks.append((k, v, pos, pos >= 0))
        q_pos = jnp.full((batch, 1), sinks + ring - 1, jnp.int32)
        with jax.default_matmul_precision("highest"):
            want = jax.jit(lambda q, b: block_attention(q, b, q_pos, window=window, sinks=sinks))(q, blocks)
            got = jax.jit(lambda q, b: block_attention(q, b, q_pos, window=window, sinks=sinks, kernel=True))(
                q, blocks)
        err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
        out[name] = err / max(float(jnp.abs(want.astype(jnp.float32)).max()), 1e-30)
    from pallas_kernels.decode_attention import key_split

    out["kernel_blocks"] = [n for n in (sinks, ring) if n and key_split(n, d)]  # the rest stays on the XLA path
    out["ok"] = bool(out["kernel_blocks"] and out["float32"] < 1e-4 and out["bfloat16"] < 2e-2)
    return out


def fused_memory(on):
    """decode.FUSED_MEMORY_DECODE set to `on` inside the block (None: the library's setting)."""
    return decode_switch("FUSED_MEMORY_DECODE", on)


def check_fused(dec, batch, window, sinks):
    """One decode step from the same random cache (a context past the window, so every sequence evicts) with the XLA
    memory step and with the fused kernel: max |difference| of the logits and of every layer's memory state, each
    also relative to the largest magnitude of the XLA result. The state must agree to float32 rounding; the logits of
    a deep random bf16 model amplify last-bit differences of one readout (H100, 36 layers: 7 % for 1e-3 relative
    noise in the states), so they are judged against that sensitivity (state_sensitivity), measured alongside."""
    context = window + sinks + 64
    cache = random_cache(dec, batch, context, 2, jax.random.key(11))
    copy = jax.tree.map(jnp.copy, cache)  # the step donates its cache on the GPU
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 500, size=(batch, 1)), jnp.int32)
    with fused_memory(False):
        ref_logits, ref_cache = dec.step(tokens, cache)
    with fused_memory(True):
        logits, new_cache = dec.step(tokens, copy)

    def diff(a, b):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        err, scale = float(jnp.abs(a - b).max()), float(jnp.abs(b).max())
        return {"max_abs": err, "relative": err / max(scale, 1e-30)}

    states = [diff(n.memory, r.memory) for n, r in zip(new_cache.layers, ref_cache.layers) if r.memory is not None]
    out = {"context": context, "batch": batch, "logits": diff(logits, ref_logits),
           "state_max_abs": max(d["max_abs"] for d in states), "state_relative": max(d["relative"] for d in states),
           "sensitivity": state_sensitivity(dec, batch, window, sinks)}
    out["ok"] = bool(out["state_relative"] < 1e-4 and
                     out["logits"]["relative"] <= max(1e-4, 2 * out["sensitivity"]["logits_relative"]))
    return out


def state_sensitivity(dec, batch, window, sinks, rel=1e-3):
    """How far the logits of one (XLA-path) decode step move when every memory state is multiplied by
    (1 + rel * N(0, 1)): the scale against which a bf16 fused-vs-XLA logits difference is judged (a deep random bf16
    model amplifies last-bit differences of one layer's memory readout)."""
    context = window + sinks + 64
    cache = random_cache(dec, batch, context, 2, jax.random.key(11))
    layers = list(cache.layers)
    keys = jax.random.split(jax.random.key(12), len(layers))
    noisy = tuple(lay if lay.memory is None else lay._replace(memory=jax.tree.map(
        lambda x: x * (1 + rel * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype), lay.memory))
        for lay, k in zip(layers, keys))
    other = cache.replace(layers=noisy)
    copy = jax.tree.map(jnp.copy, cache)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 500, size=(batch, 1)), jnp.int32)
    with fused_memory(False):
        ref, _ = dec.step(tokens, copy)
        moved, _ = dec.step(tokens, other)
    err = float(jnp.abs(moved - ref).max())
    return {"state_noise_relative": rel, "logits_max_abs": err, "logits_relative": err / float(jnp.abs(ref).max())}


def fused_check_only(args, out_dir):
    """--fused-check-only: the fused memory kernel against the XLA path at Qwen2.5-3B widths, in float32 at the
    highest matmul precision (must agree to float32 rounding) and in bfloat16 (against the state-noise sensitivity
    of the same model), for each of --check-layers layer counts. Writes $OUT/fused_check.json."""
    from ahn_jax.inference.decode import Decoder

    window, sinks = 256, 16  # widths as in the benchmark; the ring's length does not change the memory step
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "window": window, "sinks": sinks, "checks": []}
    for dtype in ("float32", "bfloat16"):
        for layers in [int(n) for n in args.check_layers.split(",")]:
            dec = Decoder(build_hybrid(build_base(layers, args.smoke, dtype), window, sinks))
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                row = {"dtype": dtype, "layers": layers, "check": check_fused(dec, 1, window, sinks)}
            print(row, flush=True)
            out["checks"].append(row)
            with open(os.path.join(out_dir, "fused_check.json"), "w") as f:
                json.dump(out, f, indent=2)
            del dec
    return out


def profile_decode(dec, cache, out_dir, tag, keep_trace=False):
    """A jax.profiler trace of 5 decode steps, summarised (trace_summary.py: per GPU stream the kernels per step,
    their time, the busy fraction of the step's span, the costliest kernels). keep_trace: also copy the raw trace into
    out_dir as decode_profile_<tag>*.xplane.pb (xprof / TensorBoard; large)."""
    import glob
    import shutil
    import tempfile

    from trace_summary import summarize_dir

    steps = 5
    tokens = jnp.zeros((cache.batch, 1), jnp.int32)
    one, logits = stepper(dec, cache, tokens)
    logits, cache = one(logits, cache)
    logits.block_until_ready()
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                logits, cache = one(logits, cache)
            logits.block_until_ready()
        summary = summarize_dir(tmp, steps=steps)
        if keep_trace:
            for i, f in enumerate(sorted(glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True))):
                dst = os.path.join(out_dir, f"decode_profile_{tag}{'' if i == 0 else f'_{i}'}.xplane.pb")
                shutil.copyfile(f, dst)
                written.append(dst)
    return summary, written, cache


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--windows", default="32640,8192", help="hybrid windows (each with --sinks sinks)")
    p.add_argument("--sinks", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed loops of --steps steps; the median is reported")
    p.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    p.add_argument("--prefill-length", type=int, default=131072, help="0 = skip the prefill measurement")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--skip-full-prefill", action="store_true")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="skip a configuration whose cache estimate exceeds this (default: 85%% of device memory)")
    p.add_argument("--profile", action="store_true",
                   help="at the hybrid (first window, largest context, --profile-batch): a trace of 5 steps in $OUT, "
                        "the attention-only time and the count of ring copies in the compiled step")
    p.add_argument("--profile-batch", type=int, default=1)
    p.add_argument("--greedy-steps", type=int, default=32,
                   help="tokens per compiled device loop when timing Decoder.greedy (every row, and with --profile)")
    p.add_argument("--no-greedy-rows", action="store_true",
                   help="time only Decoder.step per row (by default each row also times Decoder.greedy: the "
                        "per-token cost without the host's per-call work)")
    p.add_argument("--keep-trace", action="store_true", help="with --profile: also copy the raw trace into $OUT")
    p.add_argument("--keep-hlo", action="store_true",
                   help="with --profile: also write the profiled hybrid step's optimised HLO to $OUT (to look up "
                        "the fusions that the trace summary's top_kernels name)")
    p.add_argument("--bandwidth-tbs", type=float, default=3.35, help="for the bandwidth floor column (H100 SXM)")
    p.add_argument("--fused-memory", action="store_true",
                   help="also time (and check, and with --profile profile) the hybrid with the fused Pallas memory "
                        "decode step (decode.FUSED_MEMORY_DECODE), as rows of kind hybrid_fused")
    p.add_argument("--fused-block-v", type=int, default=None,
                   help="with --fused-memory: the hybrid_fused rows (and their check) use the split form of the kernel "
                        "with this value block (decode.FUSED_MEMORY_BLOCK_V)")
    p.add_argument("--fused-columns", type=int, default=None,
                   help="the fused memory step in its column form with this value block (decode.FUSED_MEMORY_COLUMNS):"
                        " the library's hybrid rows, or with --fused-memory the hybrid_fused rows and their check")
    p.add_argument("--attention-kernel", action="store_true",
                   help="also time every row with the Pallas decode-attention kernel (decode.DECODE_ATTENTION_KERNEL; "
                        "kinds full_attnk / hybrid_attnk), after checking it against the XLA block attention at the "
                        "rows' ring sizes")
    p.add_argument("--donate-logits", action="store_true",
                   help="time steps that donate the previous logits buffer (see DONATE_LOGITS: does the host-side "
                        "CUDA-graph re-recording disappear when no output moves between calls?)")
    p.add_argument("--fused-check-only", action="store_true",
                   help="only compare the fused memory kernel with the XLA path (float32 and bf16, --check-layers "
                        "layer counts) and the logits' sensitivity to 1e-3 state noise; writes fused_check.json")
    p.add_argument("--check-layers", default="1,4,36", help="with --fused-check-only: model depths to check")
    p.add_argument("--smoke", action="store_true", help="tiny dims, 2 layers, short contexts: checks the script on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.batches, args.windows, args.sinks = "96,160", "1,2", "47,15", 4  # rings 48, 16
        args.layers, args.prefill_length, args.prefill_chunk, args.steps, args.repeats = 2, 200, 64, 3, 2

    from ahn_jax.inference import decode as decode_module
    from ahn_jax.inference.cache import cache_nbytes
    from ahn_jax.inference.decode import Decoder

    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    global DONATE_LOGITS
    DONATE_LOGITS = args.donate_logits
    if args.fused_block_v is not None:
        decode_module.FUSED_MEMORY_BLOCK_V = args.fused_block_v
    if args.fused_columns is not None:
        decode_module.FUSED_MEMORY_COLUMNS = args.fused_columns
    if args.fused_check_only:
        return fused_check_only(args, out_dir)
    device = jax.devices()[0]
    limit = args.memory_limit_gb * 2 ** 30 if args.memory_limit_gb else \
        0.85 * (device.memory_stats() or {}).get("bytes_limit", 80 * 2 ** 30)
    windows = [int(w) for w in args.windows.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    base = build_base(args.layers, args.smoke)
    weight_bytes = cache_nbytes(nnx_state(base))
    result = {"device": str(device), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "fused_block_v": args.fused_block_v, "fused_columns": args.fused_columns,
              "donate_logits": args.donate_logits, "shapes": "smoke" if args.smoke else "Qwen2.5-3B",
              "layers": args.layers or 36, "windows": windows, "sinks": args.sinks, "steps": args.steps,
              "repeats": args.repeats, "weights_bytes": weight_bytes,
              "decode_cache": "random contents standing for the context (no prefill)", "prefill": {}, "decode": [],
              "profile": {}}
    full = Decoder(base)
    start_all = time.perf_counter()

    if args.prefill_length:
        # Increasing order of expected peak (the device's peak counter only grows): hybrid at each length, then full.
        hybrid = Decoder(build_hybrid(base, windows[0], args.sinks))
        for length in sorted({min(n, args.prefill_length) for n in (args.prefill_length // 4, args.prefill_length // 2,
                                                                      args.prefill_length)}):
            r = measure_prefill(hybrid, length, args.prefill_chunk, weight_bytes)
            result["prefill"][f"hybrid_{length}"] = r
            print("prefill hybrid", r, flush=True)
        del hybrid
        if not args.skip_full_prefill:
            try:
                r = measure_prefill(full, args.prefill_length, args.prefill_chunk, weight_bytes)
            except Exception as e:  # noqa: BLE001 - an OOM is a result here
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["prefill"][f"full_{args.prefill_length}"] = r
            print("prefill full", r, flush=True)

    # "hybrid" rows use the memory decode step the library picks (decode.FUSED_MEMORY_DECODE, "auto": fused on GPUs);
    # with --fused-memory they are forced to the XLA step and "hybrid_fused" rows to the kernel.
    hybrid_fused = False if args.fused_memory else None
    result["fused_memory_default"] = decode_module.fused_memory_decode_enabled()

    # Tokens a row feeds: 2 warm-up steps, the timed steps, and (greedy column) 1 + 3 loops of --greedy-steps; the
    # full-KV cache is sized for them (a hybrid's does not depend on it).
    fed = args.steps * args.repeats + 2 + (0 if args.no_greedy_rows else 4 * args.greedy_steps)

    def run_row(name, dec, window, context, batch, fused=None, attn=None):
        row = {"kind": name, "window": window, "context": context, "batch": batch,
               "cache_bytes": cache_bytes_estimate(dec, batch, context, fed)}
        # Bytes one step must read at least: the weights once and the whole cache (KV, gates and state alike).
        row["floor_ms"] = 1e3 * (weight_bytes + row["cache_bytes"]) / (args.bandwidth_tbs * 1e12)
        if row["cache_bytes"] > limit:
            row["skipped"] = f"cache {row['cache_bytes'] / 2 ** 30:.1f} GiB > limit {limit / 2 ** 30:.1f} GiB"
        else:
            try:
                cache = random_cache(dec, batch, context, fed, jax.random.key(context))
                with fused_memory(fused), attention_kernel(attn):
                    sec, cache = time_decode(dec, cache, args.steps, args.repeats)
                    row.update(ms_per_step=1e3 * sec, tokens_per_s=batch / sec)
                    if not args.no_greedy_rows:  # the same decode in a compiled loop: no host work per token
                        greedy_s, cache = time_greedy(dec, cache, args.greedy_steps)
                        row.update(greedy_ms_per_token=1e3 * greedy_s, greedy_tokens_per_s=batch / greedy_s)
                del cache
            except Exception as e:  # noqa: BLE001 - an OOM is a result here
                row["skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, f"[{time.perf_counter() - start_all:.0f} s]", flush=True)
        result["decode"].append(row)
        save()

    def save():
        with open(os.path.join(out_dir, "bench_decode.json"), "w") as f:
            json.dump(result, f, indent=2)

    # --attention-kernel: the plain rows use the XLA block attention, "_attnk" rows the Pallas kernel (if it agrees).
    attn_base, attn_rows = (False, False) if args.attention_kernel else (None, False)
    if args.attention_kernel:
        from ahn_jax.inference.cache import ring_slots

        checks = []
        for ring, sinks, window in ((ring_slots(windows[0] + 1), args.sinks, None), (8192, 0, 2 ** 31 - 1)):
            try:
                checks.append(check_attention_kernel(min(batches), ring, sinks, window=window))
            except Exception as e:  # noqa: BLE001 - a kernel that fails to compile is a result; XLA rows still run
                checks.append({"ring": ring, "sinks": sinks, "ok": False,
                               "error": f"{type(e).__name__}: {str(e)[:500]}"})
        result["attention_kernel_check"] = checks
        print("attention kernel check", checks, flush=True)
        attn_rows = all(c["ok"] for c in checks)
        save()
    for context in contexts:
        for batch in batches:
            run_row("full", full, None, context, batch, attn=attn_base)
            if attn_rows:
                run_row("full_attnk", full, None, context, batch, attn=True)
    if args.profile:  # the full-KV model at the same point, for comparison (its own cache must fit)
        context = max(contexts)
        if cache_bytes_estimate(full, args.profile_batch, context, 8) <= limit:
            cache = random_cache(full, args.profile_batch, context, 8, jax.random.key(8))
            summary, files, cache = profile_decode(full, cache, out_dir, f"full_b{args.profile_batch}",
                                                   args.keep_trace)
            greedy_s, cache = time_greedy(full, cache, args.greedy_steps)
            if args.keep_hlo:
                files.append(save_step_hlo(full, cache, out_dir, f"full_b{args.profile_batch}"))
            result["profile_full"] = {"context": context, "batch": args.profile_batch, "trace_summary": summary,
                                      "trace_files": files, f"greedy_{args.greedy_steps}_ms_per_token": 1e3 * greedy_s}
            del cache
            print("profile full", json.dumps(summary)[:2000], flush=True)
    for window in windows:
        hybrid = Decoder(build_hybrid(base, window, args.sinks))
        if args.fused_memory:
            try:
                check = check_fused(hybrid, min(batches), window, args.sinks)
            except Exception as e:  # noqa: BLE001 - a kernel that fails to lower is a result; the XLA rows still run
                check = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            result.setdefault("fused_check", {})[str(window)] = check
            print("fused check", window, check, flush=True)
            save()
        for context in contexts:
            for batch in batches:
                run_row("hybrid", hybrid, window, context, batch, fused=hybrid_fused, attn=attn_base)
                if attn_rows:
                    run_row("hybrid_attnk", hybrid, window, context, batch, fused=hybrid_fused, attn=True)
                if args.fused_memory:
                    run_row("hybrid_fused", hybrid, window, context, batch, fused=True)
        if args.profile and window == windows[0]:
            cache = random_cache(hybrid, args.profile_batch, max(contexts), 8, jax.random.key(9))
            with fused_memory(hybrid_fused):
                summary, files, cache = profile_decode(hybrid, cache, out_dir,
                                                       f"hybrid_w{window}_b{args.profile_batch}", args.keep_trace)
                step_s, cache = time_decode(hybrid, cache, args.steps, 1)
                greedy_s, cache = time_greedy(hybrid, cache, args.greedy_steps)
                if args.keep_hlo:
                    files.append(save_step_hlo(hybrid, cache, out_dir, f"hybrid_w{window}_b{args.profile_batch}",
                                               hybrid_fused))
            attn_s = attention_only_seconds(hybrid, cache, args.steps)
            result["profile"] = {"window": window, "context": max(contexts), "batch": args.profile_batch,
                                 "trace_files": files, "trace_summary": summary, "step_ms": 1e3 * step_s,
                                 "attention_only_ms": 1e3 * attn_s,
                                 "rest_ms (weights, memory, writes)": 1e3 * (step_s - attn_s),
                                 "fused_memory": decode_module.fused_memory_decode_enabled()
                                 if hybrid_fused is None else hybrid_fused,
                                 "ring_copies_in_compiled_step": ring_copies(hybrid, cache, fused=hybrid_fused),
                                 f"greedy_{args.greedy_steps}_ms_per_token": 1e3 * greedy_s}
            del cache
            print("profile", json.dumps(result["profile"])[:3000], flush=True)
            if args.fused_memory and result.get("fused_check", {}).get(str(window), {}).get("ok"):
                cache = random_cache(hybrid, args.profile_batch, max(contexts), 8, jax.random.key(9))
                with fused_memory(True):
                    summary, files, cache = profile_decode(hybrid, cache, out_dir,
                                                           f"hybrid_fused_w{window}_b{args.profile_batch}",
                                                           args.keep_trace)
                    step_s, cache = time_decode(hybrid, cache, args.steps, 1)
                    greedy_s, cache = time_greedy(hybrid, cache, args.greedy_steps)
                result["profile_fused"] = {"window": window, "context": max(contexts), "batch": args.profile_batch,
                                           "trace_files": files, "trace_summary": summary, "step_ms": 1e3 * step_s,
                                           "ring_copies_in_compiled_step": ring_copies(hybrid, cache, fused=True),
                                           f"greedy_{args.greedy_steps}_ms_per_token": 1e3 * greedy_s}
                del cache
                print("profile fused", json.dumps(result["profile_fused"])[:3000], flush=True)
        del hybrid

    save()
    print_table(result, args, device)
    return 0


def nnx_state(module):
    from flax import nnx

    return nnx.state(module)


def print_table(result, args, device):
    gib = 2 ** 30
    print(f"\n{device} | {result['shapes']} shapes, {result['layers']} layers, bf16 random weights "
          f"({result['weights_bytes'] / gib:.2f} GiB) | hybrid S={args.sinks} gated_deltanet | decode caches filled "
          f"with random values | floor = (weights + cache) / {args.bandwidth_tbs} TB/s")
    print(f"{'kind':13} {'window':>7} {'context':>8} {'batch':>5} {'cache GiB':>10} {'floor ms':>9} {'ms/step':>9} "
          f"{'tok/s':>9} {'x full':>7} {'greedy ms/tok':>14} {'x full':>7}")
    # A hybrid row is compared with the full-KV row of the same attention path (kernel rows end in "_attnk").
    full = {(r["kind"].endswith("_attnk"), r["context"], r["batch"]): r for r in result["decode"]
            if r["kind"] in ("full", "full_attnk")}

    def vs_full(r, key):
        ref = full.get((r["kind"].endswith("_attnk"), r["context"], r["batch"]), {}).get(key)
        return f"{r[key] / ref:7.2f}" if r["kind"].startswith("hybrid") and ref and key in r else f"{'-':>7}"

    for r in result["decode"]:
        if "tokens_per_s" in r:
            greedy = f"{r['greedy_ms_per_token']:14.2f}" if "greedy_ms_per_token" in r else f"{'-':>14}"
            tail = (f"{r['ms_per_step']:9.2f} {r['tokens_per_s']:9.1f} {vs_full(r, 'tokens_per_s')} {greedy} "
                    f"{vs_full(r, 'greedy_tokens_per_s')}")
        else:
            tail = f"  skipped: {r['skipped'][:70]}"
        print(f"{r['kind']:13} {str(r['window'] or '-'):>7} {r['context']:8d} {r['batch']:5d} "
              f"{r['cache_bytes'] / gib:10.2f} {r['floor_ms']:9.2f} {tail}")
    for name, r in result["prefill"].items():
        if r.get("peak_bytes") is not None:
            plan = r.get("compiled_chunk_step", {}).get("step_total")
            print(f"prefill {name}: chunk {r['chunk']}: device peak {r['peak_bytes'] / gib:.2f} GiB, above the weights "
                  f"{r['peak_above_weights_bytes'] / gib:.2f} GiB (cache {r['cache_bytes'] / gib:.2f} GiB); "
                  f"compiled chunk step {'-' if plan is None else f'{plan / gib:.2f}'} GiB; "
                  f"{r['seconds_incl_compile']:.1f} s incl. compile")
        else:
            print(f"prefill {name}: {r}")
    xla = {(r["window"], r["context"], r["batch"]): r.get("ms_per_step") for r in result["decode"]
           if r["kind"] == "hybrid"}
    for r in result["decode"]:
        ref = xla.get((r["window"], r["context"], r["batch"]))
        if r["kind"] == "hybrid_fused" and ref and r.get("ms_per_step"):
            print(f"fused memory: window {r['window']} context {r['context']} batch {r['batch']}: {ref:.2f} -> "
                  f"{r['ms_per_step']:.2f} ms/step (x{ref / r['ms_per_step']:.2f})")
    for window, check in result.get("fused_check", {}).items():
        print(f"fused check window {window}: {'ok' if check['ok'] else 'MISMATCH'} {check}")
    if result["profile"]:
        print("profile:", json.dumps(result["profile"], indent=1))
    if result.get("profile_fused"):
        print("profile fused:", json.dumps(result["profile_fused"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
