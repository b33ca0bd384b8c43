"""One distillation step: teacher (full attention, no gradient) and student (window + sinks + memory) forwards in one
jitted function, KL(teacher || student) in float32 over the masked positions, AdamW on the memory parameters only.

The model is split once into (graphdef, memory params, frozen rest); only the memory params and the optimiser state
are carried and donated. `window` and `sinks` are int32 scalars, so a new sample never recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.training.losses import distill_loss
from ahn_jax.training.optim import grad_norm


@dataclasses.dataclass(frozen=True)
class StepOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0
    valid_vocab: int | None = None  # tokenizer vocabulary size; embedding rows past it are masked in the KL
    remat: bool = True
    loss_chunk: int = 512
    # AHN: only positions whose memory is non-empty (t >= sinks + window) count (AHN.md §4); AllMem: every position.
    mask_before_window: bool = True


def split_model(model):
    """(graphdef, memory params, frozen rest) of a hybrid model."""
    return nnx.split(model, MemoryParam, ...)


def loss_mask(batch, window, sinks, mask_before_window):
    """[B, T] float32: the batch's loss mask, restricted to positions with a non-empty memory when asked."""
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    if mask_before_window:
        t = jnp.arange(mask.shape[1])[None, :]
        mask = mask * (t >= window + sinks)
    return mask


def compute_loss(graphdef, mem_params, frozen, batch, window, sinks, opts: StepOptions):
    """Scalar loss and metrics for one micro-batch. batch: {"input_ids": [B, T] int32, "loss_mask": [B, T]}."""
    model = nnx.merge(graphdef, mem_params, frozen)
    ids = batch["input_ids"]
    h_teacher = jax.lax.stop_gradient(model.hidden_states(ids, teacher=True, remat=False))
    h_student = model.hidden_states(ids, window=window, sinks=sinks, remat=opts.remat)
    mask = loss_mask(batch, window, sinks, opts.mask_before_window)
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    if opts.ce_weight:
        mask = mask.at[:, -1].set(0.0)  # the last position has no next token
    return distill_loss(h_teacher, h_student, model.lm_head_matrix(), mask, labels=labels,
                        temperature=opts.temperature, valid_vocab=opts.valid_vocab, ce_weight=opts.ce_weight,
                        chunk=opts.loss_chunk)


def make_train_step(graphdef, tx: optax.GradientTransformation, opts: StepOptions, static_window=None,
                    state_shardings=None):
    """A jitted `step(mem_params, opt_state, frozen, batch, window, sinks) -> (mem_params, opt_state, metrics)`.

    static_window=(window, sinks): bake these Python ints into the compiled step (the window/sinks arguments are then
    ignored). Static windows reach the fastest attention kernels (cuDNN, Pallas), at one compilation per value;
    traced windows (the default) compile once for every value (ahn_jax.ops.attention's blockwise xla path).
    state_shardings=(mem_shardings, opt_shardings): the updated state leaves the step in these shardings (those it
    came in with), so the donated buffers are reused and the next call does not recompile; without it XLA may return
    an fsdp-sharded state replicated."""

    def step(mem_params, opt_state, frozen, batch, window, sinks):
        if static_window is not None:
            window, sinks = static_window
        def f(p):
            return compute_loss(graphdef, p, frozen, batch, window, sinks, opts)

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(mem_params)
        updates, opt_state = tx.update(grads, opt_state, mem_params)
        mem_params = optax.apply_updates(mem_params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm(grads))
        if state_shardings is not None:
            mem_params, opt_state = jax.lax.with_sharding_constraint((mem_params, opt_state), state_shardings)
        return mem_params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef, opts: StepOptions):
    """A jitted `eval(mem_params, frozen, batch, window, sinks) -> metrics` (no update)."""

    def ev(mem_params, frozen, batch, window, sinks):
        loss, metrics = compute_loss(graphdef, mem_params, frozen, batch, window, sinks, opts)
        return dict(metrics, loss=loss)

    return jax.jit(ev)
