"""Window and sink semantics, defined once (spec/AHN.md §1.3-1.4, DESIGN.md "Window and sinks, once").

A query at absolute position t sees
  - the first `sinks` tokens:           j < sinks
  - the `window` most recent tokens:    t - window < j <= t
and nothing else from attention. The AHN memory holds exactly the tokens in between:
  sinks <= j <= t - window.
These three sets partition [0, t]. `window` here is the pure window (the reference code's inference
`sliding_window`); the reference's training "lossless budget" is `sinks + window`.

AHN alignment as a sequence problem: memory step i (0-based) absorbs token `sinks + i` and is read by the query at
position `sinks + window + i` (the state *after* absorbing that token). Queries before `sinks + window` read nothing.

All functions accept Python ints or traced int32 scalars, so the window and sinks may vary per step under jit.
"""

from __future__ import annotations

import jax.numpy as jnp


def attention_visible(q_pos, k_pos, window, sinks=0):
    """Boolean mask: may the query at `q_pos` attend the key at `k_pos`? Broadcasts like ==."""
    q_pos = jnp.asarray(q_pos)
    k_pos = jnp.asarray(k_pos)
    causal = k_pos <= q_pos
    return causal & ((q_pos - k_pos < window) | (k_pos < sinks))


def memory_holds(q_pos, k_pos, window, sinks=0):
    """Boolean mask: is the key at `k_pos` inside the memory read by the query at `q_pos`? (AHN, evicted tokens)."""
    q_pos = jnp.asarray(q_pos)
    k_pos = jnp.asarray(k_pos)
    return (k_pos >= sinks) & (k_pos <= q_pos - window)


def memory_length(seq_len, window, sinks=0):
    """Number of tokens a sequence of `seq_len` tokens hands to the memory: max(seq_len - sinks - window, 0)."""
    return jnp.maximum(jnp.asarray(seq_len) - sinks - window, 0)


def first_memory_query(window, sinks=0):
    """Position of the first query that reads a non-empty memory: sinks + window."""
    return sinks + window


def evicted_position(q_pos, window):
    """Position of the token that leaves the window when the query at `q_pos` arrives (enters the memory if >= sinks)."""
    return jnp.asarray(q_pos) - window
