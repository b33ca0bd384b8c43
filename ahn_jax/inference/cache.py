"""The fixed-size decode cache (spec/AHN.md §5.3 "JAX design suggestion", spec/ALLMEM.md §5).

Per decoder layer (LayerCache):
    sink_k, sink_v   [B, Hkv, S, D]   the first S tokens, kept forever (post-RoPE, KV heads not repeated)
    ring_k, ring_v   [B, Hkv, R, D]   a ring buffer of the most recent tokens; position p >= S lives in slot (p - S) % R
    gates            pytree of [B, R, ...] float32, or None: what the memory needs when the token in that slot leaves
                     the window, computed by `mem.write_gates` when the token ENTERS (spec/AHN.md §10.1 #17)
    memory           the memory state, one per sequence: every leaf has a leading batch axis B (a scalar leaf of
                     `mem.init_state(1)` becomes [B], a [1, ...] leaf becomes [B, 1, ...]), so decode can vmap one
                     sequence at a time and each sequence keeps its own step counter (TTT "pos", pending chunk count)
Shared by all layers: ring_pos [B, R] int32 (absolute position held by each slot, -1 = empty) and lengths [B] int32
(tokens consumed so far = the position of the next token).

KV buffers are head-major ([B, Hkv, tokens, D]) so decode attention is a plain batched matmul over (B, Hkv) with no
transposed copy of the cache. The hybrid student has R = window + 1 slots (large rings rounded up: ring_slots): a
decode step first writes the new token into its slot and only then reads the buffers (attention, and the evicted token
t - W for the memory, which R >= W + 1 keeps in its slot), so each step reads only what it wrote and XLA updates every
donated buffer in place (a read of the old buffer before an in-place write makes XLA copy the whole buffer). Slots
holding tokens that have left the window are hidden by the mask (ops/window.py). The teacher (full attention) uses the
same structure with S = 0, no memory and R = max_length (rounded up alike), so its "ring" is a growing full KV cache
(slot = position) in a fixed-size buffer. Every shape depends on (batch, S, R, model dims) only, never on how many
tokens were consumed: `cache_nbytes` is the same for a 1k and a 100k context.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    sink_k: jax.Array
    sink_v: jax.Array
    ring_k: jax.Array
    ring_v: jax.Array
    gates: Any
    memory: Any


@dataclasses.dataclass(frozen=True)
class InferenceCache:
    """layers: tuple of LayerCache; ring_pos [B, R] int32; lengths [B] int32. Static: window (None = full
    attention, the teacher), sinks, teacher, sinks_full (every sequence holds all its sinks: Decoder.prefill sets it
    from the prompt lengths, and decode steps then compile without the sink writes, which could only be dropped)."""

    layers: tuple
    ring_pos: jax.Array
    lengths: jax.Array
    window: int | None = None
    sinks: int = 0
    teacher: bool = False
    sinks_full: bool = False

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def ring_size(self) -> int:
        return self.ring_pos.shape[1]

    def replace(self, **changes) -> "InferenceCache":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(InferenceCache, data_fields=["layers", "ring_pos", "lengths"],
                                 meta_fields=["window", "sinks", "teacher", "sinks_full"])


def cache_nbytes(cache) -> int:
    """Bytes of every array in the cache, from shapes and dtypes only (works on jax.eval_shape results)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


# --- memory state: batch form (what the memory modules take) <-> per-sequence form (what the cache stores) -----------
def per_sequence_state(state, batch: int):
    """mem state of a whole batch (leaves [B, ...] or scalars shared by the batch) -> per-sequence form."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,)) if jnp.ndim(x) == 0 else x[:, None], state)


def batch_state(state):
    """Per-sequence form -> batch form. Only valid when every sequence is at the same step (lockstep prefill):
    the scalar counters of sequence 0 stand for all."""
    return jax.tree.map(lambda x: x[0] if jnp.ndim(x) == 1 else x[:, 0], state)


def initial_memory_state(mem, batch: int):
    """Per-sequence form of `mem.init_state(1)` for `batch` sequences."""
    one = mem.init_state(1)
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (batch,) + jnp.shape(x)), one)


def _gate_buffers(mem, batch: int, slots: int, hidden: int, dtype):
    """Zero buffers shaped like mem.write_gates of `slots` tokens (shapes from eval_shape, nothing computed)."""
    shapes = jax.eval_shape(mem.write_gates, jax.ShapeDtypeStruct((batch, slots, hidden), dtype))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# Large rings are rounded up to a multiple of RING_ALIGN slots. Measured on an H100 (benchmarks/RESULTS.md): with
# R = 32641 or 131134 slots XLA pads the K and V buffers for the attention matmuls in every decode step (a copy of the
# whole ring, 1.75 ms of a 9 ms step at 128k), and decode attention splits the key axis into blocks that must divide R.
# The extra slots only ever hold tokens that have left the window (masked). Small rings (tests, tiny models) keep
# R = W + 1 so that wrapping is exercised early.
RING_ALIGN = 512
RING_ALIGN_FROM = 4096


def ring_slots(needed: int) -> int:
    """Slots of a ring that must hold `needed` tokens (window + 1, or a teacher's max_length)."""
    if needed <= RING_ALIGN_FROM:
        return needed
    return -(-needed // RING_ALIGN) * RING_ALIGN


def init_cache(model, batch: int, *, teacher: bool = False, max_length: int | None = None) -> InferenceCache:
    """An empty cache for `batch` sequences.

    model: HybridQwenForCausalLM (student unless teacher=True) or a plain QwenForCausalLM (always the teacher).
    teacher: full attention with a [B, max_length] KV buffer (max_length required) and no memory.
    """
    from ahn_jax.inference.decode import model_parts  # one place that knows the model classes

    base, ahn, memories = model_parts(model, teacher)
    c = base.config
    dtype = jnp.dtype(base.dtype) if isinstance(getattr(base, "dtype", None), str) else jnp.float32
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"init_cache: batch must be an int >= 1, got {batch!r}")
    if ahn is None:
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError("init_cache: the teacher (full attention) cache needs max_length (an int >= 1): the "
                             f"largest number of tokens (prompt + generated) it will hold; got {max_length!r}")
        window, sinks, slots = None, 0, ring_slots(max_length)
    else:
        window, sinks, slots = ahn.window, ahn.sinks, ring_slots(ahn.window + 1)  # + 1: see the module docstring
    kv = lambda n: jnp.zeros((batch, c.num_key_value_heads, n, c.head_dim), dtype)  # noqa: E731
    layers = []
    for i in range(c.num_hidden_layers):
        mem = memories.get(i)
        gates, state = None, None
        if mem is not None:
            state = initial_memory_state(mem, batch)
            if getattr(mem, "feed", "evicted") != "all":
                gates = _gate_buffers(mem, batch, slots, c.hidden_size, dtype)
        layers.append(LayerCache(kv(sinks), kv(sinks), kv(slots), kv(slots), gates, state))
    return InferenceCache(layers=tuple(layers), ring_pos=jnp.full((batch, slots), -1, jnp.int32),
                          lengths=jnp.zeros((batch,), jnp.int32), window=window, sinks=sinks, teacher=ahn is None)
