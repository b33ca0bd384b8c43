"""Prefill and decode with the fixed-size cache (spec/AHN.md §5, spec/ALLMEM.md §5, DESIGN.md pitfall 12).

Every step (a prefill chunk of Tc tokens, or one decode token) runs each layer as:
    u = input_layernorm(x);  q, k, v = project(u, positions)                       (post-RoPE, the frozen attention)
    o = cached_attention(q, [sinks | ring | new k], ...)                             (window/sink mask: ops/window.py)
    memory (AHN, evicted tokens): the query at position t reads the state after absorbing token t - W (if >= S); that
        token sits in ring slot (t - W - S) % W (or, in a prefill chunk longer than the window, in the chunk itself);
        its k, v and the write gates cached when it entered the window feed the memory
    memory (AllMem, feed "all"): every token is written and read in place (apply-then-update chunks, pending buffer)
    store the new tokens: position p < S -> sink slot p; else ring slot (p - S) % R (the slot of the evicted token)
Before the window is full nothing is evicted and no token is dropped (unlike the reference, spec/AHN.md §10.1 #1-2).

Prefill runs the prompt in chunks of `chunk` tokens (default 4096), so peak memory is one chunk's activations plus
the cache; all sequences of a batch advance in lockstep over their common prefix (min length), then the ragged tails
are fed one token at a time through decode with an `active` mask, so each sequence keeps its own position.
Functions are jitted once per shape (the cache has fixed shapes); the chunk's first memory step is a static argument
that is 0 once the window is full, so a long prompt compiles at most a few chunk variants.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ahn_jax.inference.cache import (
    InferenceCache, LayerCache, batch_state, init_cache, per_sequence_state)
from ahn_jax.models.hybrid import finish_layer
from ahn_jax.ops.attention import cached_attention
from ahn_jax.ops.window import evicted_position, first_memory_query

DEFAULT_PREFILL_CHUNK = 4096


def model_parts(model, teacher: bool = False):
    """-> (base QwenForCausalLM, AHNConfig or None (teacher), {layer id: memory module})."""
    from ahn_jax.models.hybrid import HybridQwenForCausalLM
    from ahn_jax.models.qwen import QwenForCausalLM

    if isinstance(model, HybridQwenForCausalLM):
        if teacher:
            return model.base, None, {}
        return model.base, model.ahn, dict(zip(model.memory_layers, model.memories))
    if isinstance(model, QwenForCausalLM):
        return model, None, {}
    raise TypeError(f"prefill/decode need a HybridQwenForCausalLM or QwenForCausalLM, got {type(model).__name__}")


def _feeds_all(mem) -> bool:
    return getattr(mem, "feed", "evicted") == "all"


def _repeat_kv(x, num_heads):
    from ahn_jax.models.hybrid import repeat_kv

    return repeat_kv(x, num_heads)


def _select(flag, new, old):
    """Per-sequence choice: flag [B] bool; leaves [B, ...]."""
    return jax.tree.map(lambda n, o: jnp.where(flag.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _store(buf, new, idx):
    """buf [B, N, ...] <- new [B, Tn, ...] at slots idx [B, Tn]; idx == N (out of range) drops the write."""
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, idx].set(new.astype(buf.dtype), mode="drop")


def _slots(cache: InferenceCache, positions):
    """(ring slot, sink slot) of each position [B, Tn]; out-of-range = dropped write."""
    r, s = cache.ring_size, cache.sinks
    if cache.window is None:  # teacher: slot = position, nothing wraps
        ring = jnp.where(positions < r, positions, r)
    else:
        ring = jnp.where(positions >= s, (positions - s) % r, r)
    return ring, jnp.where(positions < s, positions, s)


def _vmapped_step(mem, q_t, k_t, v_t, gates_t, u_t, state):
    """mem.step one sequence at a time, so each sequence keeps its own counters (TTT pos / pending count).
    q_t [B, Hq, D], gates_t leaves [B, ...], u_t [B, hidden], state in per-sequence form."""
    def one(q, k, v, g, u, s):
        y, s = mem.step(q[None], k[None], v[None], jax.tree.map(lambda a: a[None], g), u[None], s)
        return y[0], s

    return jax.vmap(one)(q_t, k_t, v_t, gates_t, u_t, state)


def _memory_decode(mem, lc, q, k, v, u, positions, window, sinks):
    """One token per sequence (Tc = 1). Returns (y [B, 1, F], new memory state, gates of the new token or None)."""
    hq = q.shape[2]
    pos = positions[:, 0]
    if _feeds_all(mem):
        gates = jax.tree.map(lambda a: a[:, 0], mem.write_gates(u))
        y, state = _vmapped_step(mem, q[:, 0], _repeat_kv(k, hq)[:, 0], _repeat_kv(v, hq)[:, 0], gates, u[:, 0],
                                 lc.memory)
        return y[:, None], state, None
    new_gates = mem.write_gates(u)
    evict = pos >= first_memory_query(window, sinks)
    slot = (evicted_position(pos, window) - sinks) % window  # the slot of the leaving token (also the new token's)
    rows = jnp.arange(pos.shape[0])
    k_old, v_old = lc.ring_k[rows, slot], lc.ring_v[rows, slot]  # [B, Hkv, D]
    g_old = jax.tree.map(lambda g: g[rows, slot], lc.gates)
    y, state = _vmapped_step(mem, q[:, 0], _repeat_kv(k_old[:, None], hq)[:, 0],
                             _repeat_kv(v_old[:, None], hq)[:, 0], g_old, u[:, 0], lc.memory)
    state = _select(evict, state, lc.memory)
    y = jnp.where(evict[:, None], y, 0)
    return y[:, None], state, new_gates


def _memory_prefill(mem, lc, q, k, v, u, p0, first_valid, window, sinks):
    """A lockstep chunk of Tc tokens at positions p0 + i (p0 traced scalar, equal for every sequence).
    Memory step i absorbs the token at p0 - W + i and is read by the query p0 + i; steps i < first_valid (static)
    have nothing to absorb yet. Returns (y [B, Tc, F], new state, gates of the chunk's tokens or None)."""
    B, tc, hq, _ = q.shape
    state0 = batch_state(lc.memory)
    if _feeds_all(mem):
        y, state = mem(q, _repeat_kv(k, hq), _repeat_kv(v, hq), mem.write_gates(u), u, initial_state=state0,
                       output_final_state=True)
        return y, per_sequence_state(state, B), None
    new_gates = mem.write_gates(u)
    if first_valid >= tc:
        return jnp.zeros((B, tc, mem.out_features), q.dtype), lc.memory, new_gates
    i = jnp.arange(first_valid, tc)
    # Source = [ring | chunk]: a leaving token older than the chunk is in its ring slot, a newer one (only when the
    # chunk is longer than the window) at chunk index i - W, i.e. concat index i.
    idx = jnp.where(i < window, (evicted_position(p0 + i, window) - sinks) % window, i)

    def source(ring, new):
        return jnp.take(jnp.concatenate([ring, new.astype(ring.dtype)], axis=1), idx, axis=1)

    k_src, v_src = source(lc.ring_k, k), source(lc.ring_v, v)
    g_src = jax.tree.map(source, lc.gates, new_gates)
    y, state = mem(q[:, first_valid:], _repeat_kv(k_src, hq), _repeat_kv(v_src, hq), g_src, u[:, first_valid:],
                   initial_state=state0, output_final_state=True)
    y = jnp.concatenate([jnp.zeros((B, first_valid, y.shape[-1]), y.dtype), y], axis=1)
    return y, per_sequence_state(state, B), new_gates


def _layer(layer, mem, lc: LayerCache, cache: InferenceCache, x, positions, ring_idx, sink_idx, *, decoding,
           first_valid):
    attn = layer.self_attn
    B, tc = positions.shape
    u = layer.input_layernorm(x)
    q, k, v = attn.project(u, positions)
    s, r = cache.sinks, cache.ring_size
    k_all = jnp.concatenate([lc.sink_k, lc.ring_k, k.astype(lc.ring_k.dtype)], axis=1)
    v_all = jnp.concatenate([lc.sink_v, lc.ring_v, v.astype(lc.ring_v.dtype)], axis=1)
    sink_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (B, s))
    k_pos = jnp.concatenate([sink_pos, cache.ring_pos, positions], axis=1)
    k_valid = jnp.concatenate([sink_pos < cache.lengths[:, None], cache.ring_pos >= 0,
                               jnp.ones((B, tc), bool)], axis=1)
    o = cached_attention(q, k_all, v_all, positions, k_pos, k_valid, window=cache.window, sinks=s)

    state, new_gates, y = lc.memory, None, None
    if mem is not None:
        if decoding:
            y, state, new_gates = _memory_decode(mem, lc, q, k, v, u, positions, cache.window, s)
        else:
            y, state, new_gates = _memory_prefill(mem, lc, q, k, v, u, cache.lengths[0], first_valid,
                                                  cache.window, s)
    x = finish_layer(layer, mem, x, o, y)

    # Store the new tokens: only the last min(Tc, R) can still be in the ring (distinct slots, no write collisions),
    # and only the first min(Tc, S) can be sinks.
    keep = min(tc, r)
    ring_k = _store(lc.ring_k, k[:, tc - keep:], ring_idx)
    ring_v = _store(lc.ring_v, v[:, tc - keep:], ring_idx)
    gates = lc.gates
    if gates is not None:
        gates = jax.tree.map(lambda g, n: _store(g, n[:, tc - keep:], ring_idx), gates, new_gates)
    sink_k, sink_v = lc.sink_k, lc.sink_v
    if s:
        ns = min(tc, s)
        sink_k = _store(sink_k, k[:, :ns], sink_idx)
        sink_v = _store(sink_v, v[:, :ns], sink_idx)
    return x, LayerCache(sink_k, sink_v, ring_k, ring_v, gates, state)


def _forward(graphdef, state, cache: InferenceCache, ids, active, *, decoding, first_valid, all_logits):
    """ids [B, Tc] at positions cache.lengths + i -> (logits [B, Tc or 1, V] float32, new cache)."""
    model = nnx.merge(graphdef, state)
    base, _, memories = model_parts(model, cache.teacher)
    B, tc = ids.shape
    positions = cache.lengths[:, None] + jnp.arange(tc, dtype=jnp.int32)[None]
    keep = min(tc, cache.ring_size)
    ring_idx, _ = _slots(cache, positions[:, tc - keep:])
    _, sink_idx = _slots(cache, positions[:, :min(tc, cache.sinks)])
    x = base.model.embed_tokens(ids)
    layers = []
    for i, layer in enumerate(base.model.layers):
        x, lc = _layer(layer, memories.get(i), cache.layers[i], cache, x, positions, ring_idx, sink_idx,
                       decoding=decoding, first_valid=first_valid)
        layers.append(lc)
    h = base.model.norm(x if all_logits else x[:, -1:])
    logits = base.logits(h)
    new = cache.replace(layers=tuple(layers), ring_pos=_store(cache.ring_pos, positions[:, tc - keep:], ring_idx),
                        lengths=cache.lengths + tc)
    if active is not None:  # ragged prompt tails: sequences already done keep their cache untouched
        new = new.replace(layers=_select(active, new.layers, cache.layers),
                          ring_pos=_select(active, new.ring_pos, cache.ring_pos),
                          lengths=jnp.where(active, new.lengths, cache.lengths))
    return logits, new


@functools.lru_cache(maxsize=None)
def _jitted(backend: str):
    # Donating the cache lets XLA update the ring in place; the CPU backend cannot use donations (and warns).
    donate = () if backend == "cpu" else (2,)
    return jax.jit(_forward, static_argnums=(0,), static_argnames=("decoding", "first_valid", "all_logits"),
                   donate_argnums=donate)


class Decoder:
    """prefill / decode for one model with its graph split once (the generation loop's hot path).

    teacher=True (or a plain QwenForCausalLM): full attention with a growing KV cache of max_length tokens.
    """

    def __init__(self, model, *, teacher: bool = False):
        self.base, self.ahn, self.memories = model_parts(model, teacher)
        self.model, self.teacher = model, teacher or self.ahn is None
        self.graphdef, self.state = nnx.split(model)
        self._fn = _jitted(jax.default_backend())

    def chunk_size(self, chunk):
        chunk = DEFAULT_PREFILL_CHUNK if chunk is None else chunk
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"prefill: chunk must be an int >= 1 or None, got {chunk!r}")
        for mem in self.memories.values():
            if _feeds_all(mem):
                # AllMem chunk boundaries are absolute multiples of C: a prefill chunk must not split a TTT chunk.
                c = mem.chunk_size
                chunk = max(c, chunk // c * c)
        return chunk

    def init_cache(self, batch, max_length=None):
        return init_cache(self.model, batch, teacher=self.teacher, max_length=max_length)

    def _call(self, cache, ids, active=None, *, decoding, first_valid=0, all_logits=False):
        return self._fn(self.graphdef, self.state, cache, ids, active, decoding=decoding, first_valid=first_valid,
                        all_logits=all_logits)

    def prefill(self, input_ids, lengths=None, *, chunk=None, max_length=None, return_all_logits=False):
        """input_ids [B, T] int (right-padded), lengths [B] (default T) -> (logits_last [B, V] float32, cache), or
        (logits_last, all_logits [B, T, V] (zeros past each length), cache) with return_all_logits."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prefill: input_ids must be a non-empty int [B, T] array, got {ids.dtype} {ids.shape}")
        B, T = ids.shape
        lengths = np.full((B,), T) if lengths is None else np.asarray(lengths).reshape(-1)
        if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T:
            raise ValueError(f"prefill: lengths must be [B={B}] ints in [1, {T}], got {lengths.tolist()}")
        if self.teacher:
            max_length = T if max_length is None else max_length
            if max_length < T:
                raise ValueError(f"prefill: max_length={max_length} is shorter than the prompt (T={T})")
        chunk = self.chunk_size(chunk)
        common = int(lengths.min())
        for mem in self.memories.values():
            if not _feeds_all(mem) and getattr(mem, "kind", "") == "ttt_mlp" and chunk < common:
                raise ValueError("prefill: a ttt_mlp memory with feed='evicted' needs a one-shot prefill (its write "
                                 f"chunks are counted from the first evicted token); pass chunk >= {common}")
        cache = self.init_cache(B, max_length)
        ids_j = jnp.asarray(ids, jnp.int32)
        first = None if self.teacher else first_memory_query(self.ahn.window, self.ahn.sinks)
        parts, p0 = [], 0
        while p0 < common:
            tc = min(chunk, common - p0)
            fv = 0 if first is None else min(max(first - p0, 0), tc)
            logits, cache = self._call(cache, ids_j[:, p0:p0 + tc], decoding=False, first_valid=fv,
                                       all_logits=return_all_logits)
            parts.append(logits)
            p0 += tc
        last = parts[-1][:, -1]
        for j in range(common, int(lengths.max())):
            active = jnp.asarray(j < lengths)
            logits, cache = self._call(cache, ids_j[:, j:j + 1], active, decoding=True)
            last = jnp.where(active[:, None], logits[:, 0], last)
            parts.append(logits)
        if not return_all_logits:
            return last, cache
        full = jnp.concatenate(parts, axis=1)
        mask = jnp.arange(full.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
        full = jnp.where(mask[..., None], full, 0)
        return last, jnp.pad(full, ((0, 0), (0, T - full.shape[1]), (0, 0))), cache

    def decode(self, token_ids, cache: InferenceCache, *, active=None):
        """token_ids [B] or [B, 1] int -> (logits [B, V] float32, cache). active [B] bool (optional): sequences
        marked False do not consume their token (their cache is unchanged)."""
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        if tokens.shape != (cache.batch,):
            raise ValueError(f"decode: token_ids must be [B={cache.batch}] or [B, 1], got {tuple(tokens.shape)}")
        if cache.teacher != self.teacher:
            raise ValueError(f"decode: the cache was made for teacher={cache.teacher}, this decoder has "
                             f"teacher={self.teacher}")
        if cache.window is None and int(jnp.max(cache.lengths)) >= cache.ring_size:
            raise ValueError(f"decode: the teacher cache is full (max_length={cache.ring_size}); prefill with a "
                             "larger max_length")
        if active is not None:
            active = jnp.asarray(active, bool)
        logits, cache = self._call(cache, tokens[:, None], active, decoding=True)
        return logits[:, 0], cache


def prefill(model, input_ids, lengths=None, *, chunk=None, teacher=False, max_length=None, return_all_logits=False):
    """input_ids [B, T] (right-padded to T), lengths [B] (default all T) -> (logits of each sequence's last token
    [B, V] float32, cache); with return_all_logits -> (last, logits [B, T, V], cache). chunk: prompt tokens per
    step (default 4096; rounded to a multiple of an AllMem write chunk). teacher: full attention with a KV buffer of
    max_length tokens (default T). See Decoder for repeated calls without re-splitting the model."""
    return Decoder(model, teacher=teacher).prefill(input_ids, lengths, chunk=chunk, max_length=max_length,
                                                   return_all_logits=return_all_logits)


def decode(model, token_ids, cache: InferenceCache, *, active=None):
    """token_ids [B] (or [B, 1]) -> (logits [B, V] float32, cache) for one new token per sequence."""
    return Decoder(model, teacher=cache.teacher).decode(token_ids, cache, active=active)
