"""Language-model pretraining of a small Qwen model from scratch (train.mode = "lm"): every base parameter trains on
next-token cross-entropy with full attention. It exists to make the tiny teacher shipped in ahn_jax/data/tiny_teacher/
(configs/tiny_teacher.py); the AHN / AllMem method itself never changes base weights (loop.py).

    python -m ahn_jax.train --config=configs/tiny_teacher.py --workdir=DIR

Outputs in WORKDIR: metrics.jsonl (loss, answer_loss, answer_acc per logged update), teacher/ (HF checkpoint dir:
config.json, model.safetensors, the tiny tokenizer's files) and teacher_eval.json (held-out answer accuracy).
No checkpoint/resume: a teacher run is minutes long and is simply re-run.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ahn_jax import sharding
from ahn_jax.training import optim

log = logging.getLogger(__name__)


def answer_weights(batch, answer_weight: float) -> np.ndarray:
    """[B, T] float32 per-target weights: loss_mask, with answer tokens (batch["answer_positions"], -1 padded) scaled
    by answer_weight. Filler tokens are unpredictable noise; the answers are what the teacher must learn to recall."""
    w = np.asarray(batch["loss_mask"], np.float32).copy()
    pos = batch.get("answer_positions")
    if pos is not None and answer_weight != 1.0:
        pos = np.asarray(pos)
        rows, cols = np.nonzero(pos >= 0)
        w[rows, pos[rows, cols]] *= answer_weight
    return w


def lm_loss(model, ids, weights):
    """Weighted next-token CE. ids [B, T] int32, weights [B, T] (weight of target token t, predicted at t - 1).
    Returns (loss, metrics): loss is the weighted mean; answer metrics count targets whose weight exceeds 1."""
    logits = model(ids)[:, :-1]  # [B, T-1, V] float32
    targets = ids[:, 1:]
    w = weights[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    is_answer = (w > 1.0).astype(jnp.float32)
    n_ans = jnp.maximum(jnp.sum(is_answer), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, {"answer_loss": jnp.sum(nll * is_answer) / n_ans, "answer_acc": jnp.sum(correct * is_answer) / n_ans}


def fan_in_init(params, seed: int):
    """Redraw every [in, out] kernel with std 1/sqrt(in) (embeddings keep the model's 0.02 init).

    Why: the HF-style 0.02 init is made for wide models; at hidden 64 it leaves attention scores ~0.1 (uniform
    attention), and training sat on a plateau with no recall at all for thousands of steps (measured: held-out recall
    at chance after 2000 steps). Larger q/k/v/o weights give content-based attention a gradient to start from."""
    from ahn_jax.hf.qwen_names import flat_params

    leaves, rebuild = flat_params(params)
    key = jax.random.key(seed)
    out = {}
    for i, (path, leaf) in enumerate(sorted(leaves.items())):
        if leaf.ndim == 2 and "embed" not in path:
            std = leaf.shape[0] ** -0.5
            leaf = (std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)).astype(leaf.dtype)
        out[path] = leaf
    return rebuild(out)


def make_lm_step(graphdef, tx):
    """A jitted `step(params, opt_state, ids [B, T], weights [B, T]) -> (params, opt_state, metrics)`."""

    def step(params, opt_state, ids, weights):
        def f(p):
            return lm_loss(nnx.merge(graphdef, p), ids, weights)

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, dict(metrics, loss=loss, grad_norm=optim.grad_norm(grads))

    return jax.jit(step, donate_argnums=(0, 1))


def heldout_answer_accuracy(model, cfg, documents: int = 32, length: int | None = None, seed: int = 1234):
    """Teacher-forced argmax accuracy of the full-attention model on held-out answer tokens, overall and for answers
    whose evidence lies beyond cfg.window (the demo's window), per task. Documents are cfg.data.cutoff_len long."""
    from ahn_jax.data import synthetic

    task_cfg = synthetic.TaskConfig(**dict(cfg.data.get("tasks") or {}))
    length = length or int(cfg.data.cutoff_len)
    window = int(cfg.window.fixed_window) if "window" in cfg else 32
    sinks = int(cfg.window.fixed_sinks) if "window" in cfg else 4
    fwd = jax.jit(lambda m, ids: jnp.argmax(m(ids), -1))
    hits = {"all": [], "beyond_window": []}
    by_task = {t: [] for t in synthetic.TASKS}
    for i in range(0, documents, 8):
        docs = [synthetic.generate_document(seed, j, split="heldout", length=length, config=task_cfg)
                for j in range(i, min(i + 8, documents))]
        preds = np.asarray(fwd(model, jnp.asarray(np.stack([d["input_ids"] for d in docs]))))
        for b, d in enumerate(docs):
            ans, ev = d["answer_positions"], d["evidence_positions"]
            ok = preds[b, ans - 1] == d["input_ids"][ans]
            beyond = synthetic.evidence_beyond_window(ans, ev, window, sinks)
            hits["all"].extend(ok.tolist())
            hits["beyond_window"].extend(ok[beyond].tolist())
            for k, task in enumerate(d["answer_task"]):
                by_task[synthetic.TASKS[task]].append(bool(ok[k]))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out["by_task"] = {k: float(np.mean(v)) for k, v in by_task.items() if v}
    out["answers"] = len(hits["all"])
    out["window"], out["sinks"], out["length"] = window, sinks, length
    return out


def pretrain(cfg, workdir, *, data_iter_factory, progress: bool = True):
    """Train a QwenForCausalLM from cfg.model.random_init on the data stream, export it to WORKDIR/teacher.
    `data_iter_factory()` yields numpy batches {"input_ids": [B, T], "loss_mask": [B, T], "answer_positions": [B, N]}.
    Returns (logged metrics, model)."""
    from ahn_jax.data.tokenizer import TINY_TOKENIZER_DIR
    from ahn_jax.hf.export import export_hf
    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.qwen import QwenForCausalLM

    if cfg.model.random_init is None:
        raise ValueError("train.mode='lm' trains from scratch: set config.model.random_init (config.json fields)")
    workdir = os.path.abspath(workdir)
    out_dir = os.path.join(workdir, "teacher")
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists: pretraining does not resume; use a fresh --workdir")
    os.makedirs(workdir, exist_ok=True)
    t = cfg.train
    model = QwenForCausalLM(QwenConfig.from_hf(dict(cfg.model.random_init)), dtype=cfg.model.dtype,
                            rngs=nnx.Rngs(t.seed))
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    graphdef, params = nnx.split(model, nnx.Param)
    if t.get("init", "model") == "fan_in":
        params = fan_in_init(params, t.seed)
    from ahn_jax.training.loop import MetricsWriter

    answer_weight = float(t.get("answer_weight", 1.0))
    with sharding.compat.set_mesh(mesh):
        params = jax.device_put(params, sharding.shard_params(params, mesh))
        tx = optim.make_optimizer(params, lr=t.lr, steps=t.steps, warmup_ratio=t.warmup_ratio,
                                  weight_decay=t.weight_decay, clip=t.clip, accumulate=t.accumulate)
        opt_state = tx.init(params)
        step_fn = make_lm_step(graphdef, tx)
        batch_sh = sharding.batch_sharding(mesh)
        data = data_iter_factory()
        writer = MetricsWriter(workdir)
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, desc="pretrain", unit="step")
        logged, acc, t0 = [], [], time.perf_counter()
        try:
            for micro in range(t.steps * t.accumulate):
                batch = next(data)
                ids = jax.device_put(np.asarray(batch["input_ids"], np.int32), batch_sh)
                w = jax.device_put(answer_weights(batch, answer_weight), batch_sh)
                params, opt_state, metrics = step_fn(params, opt_state, ids, w)
                acc.append(metrics)
                if (micro + 1) % t.accumulate:
                    continue
                update = (micro + 1) // t.accumulate
                if bar is not None:
                    bar.update(1)
                if update % t.log_every == 0 or update == t.steps:
                    m = {k: float(np.mean([float(a[k]) for a in acc])) for k in acc[0]}
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(f"pretrain: loss is {m['loss']} at update {update}")
                    m["seconds"] = time.perf_counter() - t0
                    writer.write(update, m)
                    logged.append({"step": update, **m})
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", ans_acc=f"{m['answer_acc']:.2f}")
                    acc, t0 = [], time.perf_counter()
        finally:
            writer.close()
            if bar is not None:
                bar.close()
    model = nnx.merge(graphdef, jax.device_get(params))
    if jax.process_index() == 0:
        tok_files = [os.path.join(TINY_TOKENIZER_DIR, f) for f in ("tokenizer.json", "tokenizer_config.json")]
        export_hf(model, out_dir, extra_files=tok_files)
        ev = heldout_answer_accuracy(model, cfg)
        with open(os.path.join(workdir, "teacher_eval.json"), "w") as f:
            json.dump(ev, f, indent=2)
        log.info("exported the teacher to %s; held-out answer accuracy %s", out_dir, ev)
        print(json.dumps(ev))
    return logged, model
