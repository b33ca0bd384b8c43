"""Optimiser for the memory parameters only (the frozen base never gets optimiser state): AdamW with a linear warmup
into a cosine decay, global-norm clipping and optional gradient accumulation (AHN.md §7: lr 1e-4, warmup 10 %,
weight decay 0.1, clip 1.0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def grad_norm(tree):
    """Global L2 norm of a pytree, in float32 (logged as grad_norm; written here because optax renamed its helper)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.float32(0)


def lr_schedule(lr: float, steps: int, warmup_ratio: float = 0.1, final_ratio: float = 0.0):
    """Linear warmup from 0 over warmup_ratio * steps, then cosine decay to final_ratio * lr at `steps`."""
    warmup = int(round(warmup_ratio * steps))
    if warmup == 0:
        return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=final_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=lr * final_ratio)


def decay_mask(params, decay_1d: bool = False):
    """Weight decay on matrices only unless decay_1d: gates' biases, norms, A_log and dt_bias are vectors."""
    return jax.tree.map(lambda p: decay_1d or getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(params, *, lr: float = 1e-4, steps: int = 1000, warmup_ratio: float = 0.1,
                   weight_decay: float = 0.1, clip: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, accumulate: int = 1, decay_1d: bool = False):
    """optax transformation for `params` (a pytree of the memory parameters). `steps` counts optimiser updates."""
    tx = optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(lr_schedule(lr, steps, warmup_ratio), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=decay_mask(params, decay_1d)),
    )
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx
