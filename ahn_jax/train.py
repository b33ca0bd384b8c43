"""`python -m ahn_jax.train --config=configs/qwen3b_gdn.py --workdir=DIR`: self-distillation of a memory into a frozen
Qwen model (AHN or AllMem). Any config key can be overridden: `--config.train.steps=100`; a misspelt key is an error.
Re-running with the same --workdir resumes from its newest checkpoint. SIGTERM saves a checkpoint and exits.

Outputs in WORKDIR: metrics.jsonl (one JSON object per logged update), tb/ (TensorBoard), checkpoints/ (Orbax),
ahn.safetensors (the trained memory, released AHN names) at the end; report.json when the config has a `demo` section.
With config.train.mode = "lm" it instead pretrains a small base model (training/pretrain.py; the tiny teacher).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for jax.distributed (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index (jax.distributed).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with no arguments "
                                 "(TPU pods and clusters whose environment JAX auto-detects).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for the MFU estimate (H100 bf16: 989).")


def make_data_factory(cfg):
    """A zero-argument factory of checkpointable batch iterators for the config's data section."""
    import jax

    from ahn_jax.data.pipeline import make_pipeline

    d = cfg.data
    per_host = cfg.train.batch_size // jax.process_count()
    if per_host < 1 or cfg.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the number of processes "
                         f"({jax.process_count()})")
    tokenizer = None
    if d.kind == "synthetic":
        from ahn_jax.data import synthetic
        from ahn_jax.data.tokenizer import load_tiny_tokenizer

        source = synthetic.SyntheticSource(d.max_samples, seed=d.shuffle_seed, split="train",
                                           min_length=d.min_length, max_length=d.cutoff_len,
                                           config=synthetic.TaskConfig(**dict(d.get("tasks") or {})))
        tokenizer = load_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        if not d.path:
            raise ValueError("set config.data.path to a local JSONL/parquet file, directory or tfds:NAME")
        tok_dir = d.tokenizer or cfg.model.path
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        source = d.path if d.kind != "tfds" else (d.path if d.path.startswith("tfds:") else f"tfds:{d.path}")

    def factory():
        pipe = make_pipeline(source=source, tokenizer=tokenizer, mask_mode=d.loss_mask, batch_size=per_host,
                             filter_len=d.filter_len, cutoff_len=d.cutoff_len, buckets=tuple(d.buckets) or None,
                             seed=d.shuffle_seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
        return iter(pipe)

    return factory


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required (see --help)")
    import jax

    if _DISTRIBUTED.value and not (_COORDINATOR.value or _NUM_PROCESSES.value):
        jax.distributed.initialize()
    elif _COORDINATOR.value or _NUM_PROCESSES.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    cfg = _CONFIG.value
    mode = cfg.train.get("mode", "distill")
    if mode == "lm":  # pretraining of the tiny teacher (training/pretrain.py), not the method itself
        from ahn_jax.training.pretrain import pretrain

        pretrain(cfg, os.path.abspath(_WORKDIR.value), data_iter_factory=make_data_factory(cfg))
        return
    if mode != "distill":
        raise ValueError(f"config.train.mode must be 'distill' or 'lm', got {mode!r}")
    from ahn_jax.training.loop import train

    peak = _PEAK_TFLOPS.value * 1e12 * jax.device_count() if _PEAK_TFLOPS.value else None
    logged, model = train(cfg, os.path.abspath(_WORKDIR.value), data_iter_factory=make_data_factory(cfg),
                          peak_flops=peak)
    if cfg.get("demo") is not None and jax.process_index() == 0:
        from ahn_jax.training.demo_report import write_report

        write_report(cfg, model, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
