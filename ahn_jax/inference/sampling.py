"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), with a jax PRNG key.

All functions take logits [B, V] float32 and are jit-friendly (k, p and temperature may be traced; 0 / 1.0 / None
switch a filter off). Masked entries are set to -inf before the categorical draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_mask(logits, k):
    """[B, V] bool: True for the k largest logits of each row (ties at the k-th value are kept). k <= 0 keeps all."""
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    k = jnp.asarray(k, jnp.int32)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[..., ::-1],
                              jnp.clip(k - 1, 0, vocab - 1)[..., None] * jnp.ones(logits.shape[:-1] + (1,),
                                                                                    jnp.int32), axis=-1)
    return (logits >= kth) | (k <= 0)


def top_p_mask(logits, p):
    """[B, V] bool: the smallest set of most probable tokens whose probability sum reaches p (the most probable
    token is always kept). p >= 1 keeps all."""
    logits = jnp.asarray(logits, jnp.float32)
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # A token stays if the mass strictly before it is below p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (before < p) | (jnp.asarray(p) >= 1.0)
    keep = jnp.zeros_like(keep_sorted)
    rows = jnp.arange(logits.shape[0])[:, None]
    return keep.at[rows, order].set(keep_sorted)


def sample(logits, key, *, temperature=1.0, top_k=0, top_p=1.0):
    """logits [B, V] -> token ids [B] int32. temperature <= 0 is greedy (argmax, key unused)."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {logits.shape}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    scaled = logits / temperature
    mask = top_k_mask(scaled, top_k) & top_p_mask(scaled, top_p)
    return jax.random.categorical(key, jnp.where(mask, scaled, -jnp.inf), axis=-1).astype(jnp.int32)
