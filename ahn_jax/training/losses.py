"""Distillation losses in float32, computed chunk by chunk over the sequence so that neither the teacher's nor the
student's [B, T, V] float32 logits ever exist whole (AHN.md §4; DESIGN.md: softmax/KL always in float32).

The loss takes final hidden states (after the final norm) and the LM head matrix; logits are formed per chunk of
positions inside a rematerialised scan body, so the backward pass recomputes them instead of storing them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_kl_terms(h_t, h_s, head, mask, labels, temperature, valid_vocab, ce_weight):
    """Sums over one chunk of positions. h_*: [B, C, D]; head: [D, V]; mask: [B, C] float; labels: [B, C] int."""
    logits_t = jnp.einsum("bcd,dv->bcv", h_t, head, preferred_element_type=jnp.float32)
    logits_s = jnp.einsum("bcd,dv->bcv", h_s, head, preferred_element_type=jnp.float32)
    if valid_vocab is not None and valid_vocab < head.shape[-1]:
        # Embedding rows past the tokenizer's vocabulary are padding (DESIGN pitfall 5): they take no probability.
        pad = jnp.arange(head.shape[-1]) >= valid_vocab
        logits_t = jnp.where(pad, -jnp.inf, logits_t)
        logits_s = jnp.where(pad, -jnp.inf, logits_s)
    logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(logits_t) / temperature, axis=-1)
    logp_s = jax.nn.log_softmax(logits_s / temperature, axis=-1)
    p_t = jnp.exp(logp_t)
    # where p_t == 0 (masked vocabulary), the term is 0 * (-inf - -inf): guard it.
    kl = jnp.sum(jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0), axis=-1)  # [B, C]
    kl_sum = jnp.sum(kl * mask) * temperature**2
    ce_sum = jnp.zeros((), jnp.float32)
    if ce_weight:
        logp_s1 = jax.nn.log_softmax(logits_s, axis=-1)
        nll = -jnp.take_along_axis(logp_s1, labels[..., None], axis=-1)[..., 0]
        ce_sum = jnp.sum(nll * mask)
    return kl_sum, ce_sum


def distill_loss(h_teacher, h_student, head, mask, *, labels=None, temperature=1.0, valid_vocab=None,
                 ce_weight=0.0, chunk=512):
    """Mean over masked positions of KL(teacher || student) (+ ce_weight * student CE on `labels`).

    h_teacher, h_student: [B, T, D] final hidden states (the teacher's carry no gradient).
    head: [D, V] LM head (the transposed embedding table when tied).
    mask: [B, T] 0/1, the positions that count (answer tokens past the window, padding excluded).
    labels: [B, T] next-token ids for CE (position t predicts labels[t]); required iff ce_weight > 0.
    Returns (loss, metrics dict with 'kl', 'ce', 'tokens').
    """
    B, T, D = h_student.shape
    if h_teacher.shape != h_student.shape:
        raise ValueError(f"teacher hidden {h_teacher.shape} != student hidden {h_student.shape}")
    if mask.shape != (B, T):
        raise ValueError(f"mask shape {mask.shape} != {(B, T)}")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if labels is None:
        labels = jnp.zeros((B, T), jnp.int32)
    chunk = min(chunk, T)
    pad = (-T) % chunk
    mask = mask.astype(jnp.float32)
    if pad:
        h_teacher, h_student = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (h_teacher, h_student))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    n = (T + pad) // chunk

    def split(x):
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(
        lambda c, xs: (c, _chunk_kl_terms(*xs[:2], head, xs[2], xs[3], temperature, valid_vocab, ce_weight)))
    _, (kl_sums, ce_sums) = jax.lax.scan(body, None, (split(h_teacher), split(h_student), split(mask), split(labels)))
    tokens = jnp.sum(mask)
    denom = jnp.maximum(tokens, 1.0)
    kl = jnp.sum(kl_sums) / denom
    ce = jnp.sum(ce_sums) / denom
    return kl + ce_weight * ce, {"kl": kl, "ce": ce, "tokens": tokens}
