"""The distillation loop: build the hybrid model, shard it, stream data, step, log, checkpoint, resume, export.

Every optimiser update is `train.accumulate` micro-steps; each micro-step draws its own window/sinks from a generator
seeded by (seed, micro-step), so a resumed run sees exactly the draws and batches of an uninterrupted one.
Logging (process 0 only): a tqdm bar with tokens/s, WORKDIR/metrics.jsonl (one JSON object per logged update with
`step` and `loss`), TensorBoard scalars when tensorboardX is installed.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ahn_jax import sharding
from ahn_jax.training import optim, windows
from ahn_jax.training.checkpointing import Checkpointer, StopFlag
from ahn_jax.training.step import StepOptions, make_train_step, split_model

log = logging.getLogger(__name__)


# --- model ---------------------------------------------------------------------------------------------------------
def ahn_config_from(cfg):
    """AHNConfig from the config's `ahn` and `window` sections (window/sinks here are the defaults for inference;
    training passes sampled values)."""
    from ahn_jax.models.hybrid_config import AHNConfig

    a, w = cfg.ahn, cfg.window
    return AHNConfig(memory=a.memory, window=int(w.fixed_window), sinks=int(w.fixed_sinks),
                     layers=None if a.layers is None else tuple(a.layers), chunk_size=int(a.chunk_size),
                     memory_impl=a.impl, attention_impl=a.attention_impl, max_window=int(w.max_window),
                     max_sinks=int(w.max_sinks))


def build_model(cfg):
    """The hybrid student from model.path (HF or Orbax dir) or model.random_init (a dict of config.json fields)."""
    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.hybrid import HybridQwenForCausalLM
    from ahn_jax.models.loading import load_pretrained
    from ahn_jax.models.qwen import QwenForCausalLM

    ahn = ahn_config_from(cfg)
    if cfg.model.path and cfg.ahn.weights:
        return load_pretrained(cfg.model.path, dtype=cfg.model.dtype, ahn=ahn, ahn_weights=cfg.ahn.weights)
    if cfg.model.path:
        # A fresh memory on a pretrained base: seeded exactly like the random_init path, so runs are reproducible.
        base = load_pretrained(cfg.model.path, dtype=cfg.model.dtype)
        return HybridQwenForCausalLM(base, ahn, rngs=nnx.Rngs(cfg.train.seed + 1))
    if cfg.model.random_init is None:
        raise ValueError("set config.model.path (a local HF or Orbax directory) or config.model.random_init")
    base = QwenForCausalLM(QwenConfig.from_hf(dict(cfg.model.random_init)), dtype=cfg.model.dtype,
                           rngs=nnx.Rngs(cfg.train.seed))
    return HybridQwenForCausalLM(base, ahn, rngs=nnx.Rngs(cfg.train.seed + 1))


# --- windows --------------------------------------------------------------------------------------------------------
def sample_window(cfg, micro_step: int, seq_len: int) -> windows.WindowSample:
    rng = windows.step_rng(cfg.train.seed, micro_step)
    w = cfg.window
    if w.kind == "allmem":
        return windows.sample_allmem(rng)
    return windows.sample_ahn(rng, seq_len, kind=w.kind, sink_kind=w.sink_kind, fixed_window=w.fixed_window,
                              fixed_sinks=w.fixed_sinks)


# --- logging --------------------------------------------------------------------------------------------------------
class MetricsWriter:
    """metrics.jsonl (+ TensorBoard if tensorboardX is installed), on process 0 only."""

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.enabled else None
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                log.info("tensorboardX not installed: no TensorBoard scalars (metrics.jsonl still written)")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self):
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def estimate_flops_per_token(model) -> float:
    """6N for the trained path (teacher fwd 2N + student fwd 2N + activation bwd 2N; PERF.md's MFU convention)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.base, nnx.Param)))
    return 6.0 * n


# --- the loop -------------------------------------------------------------------------------------------------------
def train(cfg, workdir, *, data_iter_factory, peak_flops: float | None = None, progress: bool = True):
    """Run (or resume) training. `data_iter_factory()` returns an iterator of numpy batches
    {"input_ids": [B, T], "loss_mask": [B, T]} with get_state()/set_state(). Returns the list of logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    model = build_model(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    graphdef, mem_params, frozen = split_model(model)
    del model
    with sharding.compat.set_mesh(mesh):
        mem_params = jax.device_put(mem_params, sharding.shard_params(mem_params, mesh))
        frozen = jax.device_put(frozen, sharding.shard_params(frozen, mesh))
        t = cfg.train
        tx = optim.make_optimizer(mem_params, lr=t.lr, steps=t.steps, warmup_ratio=t.warmup_ratio,
                                  weight_decay=t.weight_decay, clip=t.clip, accumulate=t.accumulate)
        opt_state = tx.init(mem_params)
        # Optimizer moments follow their parameters' shardings (same paths); counters are replicated.
        opt_state = jax.device_put(opt_state, sharding.shard_params(opt_state, mesh))
        state_sh = (jax.tree.map(lambda x: x.sharding, mem_params), jax.tree.map(lambda x: x.sharding, opt_state))
        opts = StepOptions(temperature=t.temperature, ce_weight=t.ce_weight, remat=t.remat,
                           valid_vocab=getattr(cfg.data, "valid_vocab", None) or None,
                           mask_before_window=cfg.ahn.memory != "ttt_mlp")
        # window.static: one compiled step per sampled (window, sinks) value, reaching the static-window kernels.
        static_steps = {} if cfg.window.get("static", False) else None
        traced_step = make_train_step(graphdef, tx, opts, state_shardings=state_sh) if static_steps is None else None

        def step_fn(mem_params, opt_state, frozen, batch, window, sinks):
            if static_steps is None:
                return traced_step(mem_params, opt_state, frozen, batch, jnp.int32(window), jnp.int32(sinks))
            key = (int(window), int(sinks))
            if key not in static_steps:
                static_steps[key] = make_train_step(graphdef, tx, opts, static_window=key, state_shardings=state_sh)
            return static_steps[key](mem_params, opt_state, frozen, batch, jnp.int32(window), jnp.int32(sinks))

        data = data_iter_factory()
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.ckpt.keep, every=cfg.ckpt.every,
                            async_save=cfg.ckpt.async_save)
        micro = 0
        if ckpt.latest_step() is not None:
            state = {"params": mem_params, "opt": opt_state, "micro": jnp.int32(0)}
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            restored, data_state, _ = ckpt.restore(abstract)
            mem_params, opt_state, micro = restored["params"], restored["opt"], int(restored["micro"])
            if data_state is not None:
                data.set_state(data_state)
            log.info("resumed from micro-step %d (update %d)", micro, micro // t.accumulate)

        writer = MetricsWriter(workdir)
        stop = StopFlag()
        total_micro = t.steps * t.accumulate
        flops_per_token = estimate_flops_per_token(nnx.merge(graphdef, mem_params, frozen))
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=micro // t.accumulate, desc="train", unit="step")
        logged, acc, tokens, t0 = [], [], 0, time.perf_counter()
        batch_sh = sharding.batch_sharding(mesh)
        try:
            while micro < total_micro:
                batch = next(data)
                ids = np.asarray(batch["input_ids"], np.int32)
                ws = sample_window(cfg, micro, ids.shape[1])
                # Each process holds its own rows: assemble the global batch from the per-process pieces.
                dev_batch = {"input_ids": jax.make_array_from_process_local_data(batch_sh, ids),
                             "loss_mask": jax.make_array_from_process_local_data(
                                 batch_sh, np.asarray(batch["loss_mask"], np.float32))}
                mem_params, opt_state, metrics = step_fn(mem_params, opt_state, frozen, dev_batch, ws.window,
                                                         ws.sinks)
                micro += 1
                tokens += ids.size
                acc.append(metrics)
                if micro % t.accumulate:
                    continue
                update = micro // t.accumulate
                if bar is not None:
                    bar.update(1)
                if update % t.log_every == 0 or update == t.steps:
                    m = {k: float(np.mean([float(a[k]) for a in acc])) for k in acc[0]}
                    dt = time.perf_counter() - t0
                    m["tokens_per_s"] = tokens / dt
                    m["lr"] = float(optim.lr_schedule(t.lr, t.steps, t.warmup_ratio)(update - 1))
                    if peak_flops:
                        m["mfu"] = m["tokens_per_s"] * flops_per_token / peak_flops
                    writer.write(update, m)
                    logged.append({"step": update, **m})
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    acc, tokens, t0 = [], 0, time.perf_counter()
                state = {"params": mem_params, "opt": opt_state, "micro": jnp.int32(micro)}
                ckpt.save(update, state, data_state=data.get_state(), config=cfg.to_dict(),
                          force=stop.requested or update == t.steps)
                if stop.requested:
                    log.warning("stopping at update %d after SIGTERM (checkpoint saved)", update)
                    break
        finally:
            ckpt.close()
            writer.close()
            stop.restore_handlers()
            if bar is not None:
                bar.close()
        model = nnx.merge(graphdef, mem_params, frozen)
        if t.export_ahn and micro >= total_micro and jax.process_index() == 0:
            export_memory(model, os.path.join(workdir, "ahn.safetensors"))
    return logged, model


def export_memory(model, path):
    """Write the trained memory as an AHN-only safetensors file (the released checkpoints' names) -> True, or log a
    warning and return False for a memory kind without released names (AllMem)."""
    from ahn_jax.hf.ahn_names import NAME_MAP, export_ahn_weights

    memories = model.memories_by_layer()
    kinds = sorted({getattr(m, "kind", type(m).__name__) for m in memories.values()})
    if not set(kinds) <= set(NAME_MAP):  # AllMem (ttt_mlp) has no released checkpoint layout to write
        log.warning("memory kind %s has no released AHN names: not exported as AHN-only safetensors (the Orbax "
                    "checkpoint in the workdir holds it)", kinds)
        return False
    export_ahn_weights(path, memories)
    log.info("exported the memory to %s", path)
    return True
