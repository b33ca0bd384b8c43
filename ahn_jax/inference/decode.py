"""Prefill and decode with the fixed-size cache (spec/AHN.md §5, spec/ALLMEM.md §5, DESIGN.md pitfall 12).

Every step (a prefill chunk of Tc tokens, or one decode token) runs each layer as:
    u = input_layernorm(x);  q, k, v = project(u, positions)                       (post-RoPE, the frozen attention)
    attention over the key blocks [sinks, ring] (+ the chunk itself in prefill), one float32 softmax whose mask is
        ops/window.py's attention_visible on each slot's absolute position (block_attention below)
    memory (AHN, evicted tokens): the query at position t reads the state after absorbing token t - W (if >= S); that
        token sits in ring slot (t - W - S) % R (or, in a prefill chunk longer than the window, in the chunk itself);
        its k, v and the write gates cached when it entered the window feed the memory
    memory (AllMem, feed "all"): every token is written and read in place (apply-then-update chunks, pending buffer)
    store the new tokens: position p < S -> sink slot p; else ring slot (p - S) % R
Before the window is full nothing is evicted and no token is dropped (unlike the reference, spec/AHN.md §10.1 #1-2).

Decode writes first, then reads (cache.py: R >= W + 1): the new token goes into its slot of the donated buffers
(a per-sequence scatter, updated in place), then attention and the memory's read of the evicted token use the written
buffers. Nothing copies the window: no concatenation of [sinks | ring | new], no repeated KV heads (grouped-query
attention reshapes q to [B, Hkv, G, D] against K [B, Hkv, R, D]), no select over whole buffers (a sequence that is not
`active` has its writes dropped instead). Prefill attends before it writes (its chunk is a key block of its own).

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
from ahn_jax.ops.window import attention_visible, evicted_position, first_memory_query

DEFAULT_PREFILL_CHUNK = 4096
# Prefill attends in tiles of this many queries (lax.map): block_attention materialises float32 scores of
# [queries x keys], which for a 4096-token chunk over a 32k ring is ~8.6 GB per layer; a 256-query tile keeps it
# ~0.6 GB (and for the teacher at 128k context ~2 GB) at the cost of a sequential loop over the tiles.
PREFILL_QUERY_TILE = 256
# The DeltaNet / Gated DeltaNet decode memory step as one Pallas kernel per layer (pallas_kernels/memory_decode.py)
# instead of ~20 small XLA kernels. "auto": on GPUs only (H100, Qwen2.5-3B shapes: 1.14x at batch 1, 1.02-1.05x at
# batch 32; float32 logits equal the XLA path's to 3e-6: benchmarks/RESULTS.md, "Fourth version"); elsewhere it would
# run in Pallas interpret mode (slow on CPU; TPU untested). True / False force it. Read per call and passed to the
# jitted step as a static argument (flipping it recompiles, never stale).
FUSED_MEMORY_DECODE = "auto"
# None: the fused step is one kernel, one program per (sequence, query head): 16 programs at batch 1 for Qwen2.5-3B,
# 12.6 us per layer on the H100. An int (dividing head_dim) selects the split form: the state update over
# (B, Hq, head_dim / block) programs, then the head as a second kernel. H100, block 32: state 0.124 + head 0.355 ms
# per step vs 0.455 for the one kernel (the head costs what was saved), greedy within noise (RESULTS.md, "Fifth
# version"): off.
FUSED_MEMORY_BLOCK_V = None
# FUSED_MEMORY_COLUMNS, an int (dividing head_dim): the column form instead (pallas_kernels/memory_decode.
# fused_delta_decode_columns): one kernel over (B, Hq, head_dim / block) programs that also writes the head's
# partials (per value block; the gate dot shared out by hidden blocks), finished by XLA; it takes precedence over
# FUSED_MEMORY_BLOCK_V. None: off. "auto": 16-column blocks (memory_decode.COLUMN_BLOCK) where the one-kernel form
# would have fewer than COLUMNS_BELOW_PROGRAMS programs (batch x query heads), else off. H100, Qwen2.5-3B shapes, 128k
# context, greedy ms per token, one kernel vs columns: batch 1 4.40 vs 4.25 (W=8,192), 4.81 vs 4.60 (W=32,640);
# batch 32 10.40 vs 10.85, 21.52 vs 22.10 (benchmarks/RESULTS.md, decode "Seventh version"; the kernel itself
# 12.6 -> 5.0 us per layer at b1).
FUSED_MEMORY_COLUMNS = "auto"
COLUMNS_BELOW_PROGRAMS = 132  # an H100's SMs
# Decode attention (one new token per sequence) over the cache's blocks (sinks and ring) as one Pallas kernel launch
# (pallas_kernels/decode_attention.py: flash-decoding partials, merged here) instead of a dozen small XLA kernels.
# H100, Qwen2.5-3B shapes, 128k context, ms per token in Decoder.greedy, XLA -> kernel: full KV b1 5.60 -> 5.46;
# hybrid W=32,640 b1 5.17 -> 5.07, b32 23.73 -> 22.17; W=8,192 b1 5.02 -> 4.81, b32 10.78 -> 10.68; attention
# output vs XLA 4e-7 relative in float32 (RESULTS.md, decode "Sixth version"). "auto": on GPUs only; True / False
# force it (elsewhere it runs in Pallas interpret mode). Blocks whose length no power-of-two split divides, and head
# sizes that are not powers of two, keep the XLA form. Read per call, a static argument of the jitted step.
DECODE_ATTENTION_KERNEL = "auto"
# Finite "minus infinity" for masked scores (as in ops/attention.py): exp() stays NaN-free; rows with no visible key
# are zeroed explicitly.
_MASKED = -1e30


def fused_memory_decode_enabled() -> bool:
    """FUSED_MEMORY_DECODE resolved for this process's default backend."""
    if FUSED_MEMORY_DECODE == "auto":
        return jax.default_backend() == "gpu"
    return bool(FUSED_MEMORY_DECODE)


def decode_attention_kernel_enabled() -> bool:
    """DECODE_ATTENTION_KERNEL resolved for this process's default backend."""
    if DECODE_ATTENTION_KERNEL == "auto":
        return jax.default_backend() == "gpu"
    return bool(DECODE_ATTENTION_KERNEL)


def auto_memory_columns(batch: int, heads: int, head_dim: int):
    """FUSED_MEMORY_COLUMNS="auto" for a step of `batch` sequences: the column form's default block
    (memory_decode.COLUMN_BLOCK) when the one-kernel form would run fewer than COLUMNS_BELOW_PROGRAMS programs, else
    None (the one-kernel form)."""
    from pallas_kernels.memory_decode import COLUMN_BLOCK

    return COLUMN_BLOCK if batch * heads < COLUMNS_BELOW_PROGRAMS and head_dim % COLUMN_BLOCK == 0 else None


def _fused_memory_static():
    """The static jit argument naming the memory decode path: False (XLA), or ("fused", FUSED_MEMORY_BLOCK_V,
    FUSED_MEMORY_COLUMNS) so that changing any switch recompiles instead of reusing a stale step."""
    return ("fused", FUSED_MEMORY_BLOCK_V, FUSED_MEMORY_COLUMNS) if fused_memory_decode_enabled() else False


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


def _store(buf, new, idx, in_bounds=False):
    """buf [B, N, ...] <- new [B, Tn, ...] at slots idx [B, Tn]; idx == N (out of range) drops the write.
    in_bounds: the caller guarantees every idx < N (no drop test in the scatter)."""
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, idx].set(new.astype(buf.dtype), mode="promise_in_bounds" if in_bounds else "drop")


def _store_kv(buf, new, idx, in_bounds=False):
    """Head-major buf [B, Hkv, N, D] <- token-major new [B, Tn, Hkv, D] at token slots idx [B, Tn] (one scatter,
    in place on a donated buffer); idx == N drops the write (in_bounds: as in _store)."""
    rows = jnp.arange(buf.shape[0])[:, None]
    # Advanced indices split by a slice: the indexed view is [B, Tn, Hkv, D], new's own layout.
    return buf.at[rows, :, idx].set(new.astype(buf.dtype), mode="promise_in_bounds" if in_bounds else "drop")


def block_attention(q, blocks, q_pos, *, window, sinks, scale=None, kernel=False):
    """Attention of new queries over several key blocks of a cache, as one softmax, without concatenating the blocks
    or repeating KV heads.

    q [B, Tq, Hq, D]; q_pos [B, Tq] int absolute positions; blocks: sequence of (k, v, k_pos, k_valid) with k, v
    [B, Hkv, N, D] (head-major, Hq % Hkv == 0; N may differ per block), k_pos [B, N] int absolute positions,
    k_valid [B, N] bool (False for empty slots). window None = full causal. A key is seen when
    attention_visible(q_pos, k_pos, window, sinks) & k_valid; a query that sees no key gets zeros.
    Query head h uses KV head h // (Hq / Hkv) (as models.hybrid.repeat_kv). Scores, softmax and the weighted sum
    accumulate in float32 (the probabilities meet V in V's dtype, as in ops.attention). Returns [B, Tq, Hq, D] in
    q's dtype. kernel (decode, Tq = 1): the blocks whose length a power-of-two split divides go through one launch
    of the Pallas kernel (pallas_kernels/decode_attention.py), which returns the same per-split partials.
    """
    B, tq, hq, d = q.shape
    blocks = [b for b in blocks if b[0].shape[2] > 0]
    if not blocks:
        raise ValueError("block_attention: no key blocks with at least one slot")
    hkv = blocks[0][0].shape[1]
    for k, v, k_pos, k_valid in blocks:
        n = k.shape[2]
        if k.shape != (B, hkv, n, d) or v.shape != k.shape or k_pos.shape != (B, n) or k_valid.shape != (B, n) \
                or hq % hkv:
            raise ValueError(f"block_attention: need q [B,Tq,Hq,D] = {q.shape}, k = v [B,Hkv,N,D] with Hq % Hkv == 0,"
                             f" k_pos = k_valid [B,N]; got k {k.shape}, v {v.shape}, k_pos {k_pos.shape}, "
                             f"k_valid {k_valid.shape}")
    window = jnp.iinfo(jnp.int32).max if window is None else window
    scale_f = float(d ** -0.5 if scale is None else scale)
    scale = jnp.float32(scale_f)
    qg = q.reshape(B, tq, hkv, hq // hkv, d)
    # Per block and per key split: the split's own row max m, sum of exp (den) and weighted values (num); combined
    # below with one global max. Splitting the key axis (flash-decoding) matters for decode: one query per head gives
    # XLA only B * Hq rows to reduce over, so a 131k-key softmax ran on 16 thread blocks (H100 profile,
    # benchmarks/RESULTS.md); with splits of L keys there are B * Hq * N / L rows.
    parts = []
    if kernel and tq == 1:  # every block a split divides: one kernel launch for all of them
        fits = [_decode_attention().key_split(b[0].shape[2], d, max(b[0].dtype.itemsize, q.dtype.itemsize)) is not None
                for b in blocks]
        if any(fits):
            m, den, num = _decode_attention().decode_attention_partials_blocks(
                q[:, 0].reshape(B, hkv, hq // hkv, d), [b for b, f in zip(blocks, fits) if f], q_pos[:, 0],
                window=window, sinks=sinks, scale=scale_f)
            # [B, Hkv, ns, G(, D)] -> the XLA layout below: [B, Hkv, G, Tq = 1, ns(, D)]
            parts.append((jnp.swapaxes(m, 2, 3)[:, :, :, None], jnp.swapaxes(den, 2, 3)[:, :, :, None],
                          jnp.swapaxes(num, 2, 3)[:, :, :, None]))
            blocks = [b for b, f in zip(blocks, fits) if not f]
    for k, v, k_pos, k_valid in blocks:
        n = k.shape[2]
        length = _key_split(n, B * hq * tq)
        ns = n // length
        mask = attention_visible(q_pos[:, :, None], k_pos[:, None, :], window, sinks) & k_valid[:, None, :]
        mask = mask.reshape(B, 1, 1, tq, ns, length)
        ks, vs = k.reshape(B, hkv, ns, length, d), v.reshape(B, hkv, ns, length, d)
        sc = jnp.einsum("bqhgd,bhsnd->bhgqsn", qg, ks, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(mask, sc, _MASKED)
        m = jnp.max(sc, axis=-1)  # [B, Hkv, G, Tq, ns]
        p = jnp.where(mask, jnp.exp(sc - m[..., None]), 0.0)
        num = jnp.einsum("bhgqsn,bhsnd->bhgqsd", p.astype(v.dtype), vs, preferred_element_type=jnp.float32)
        parts.append((m, jnp.sum(p, axis=-1), num))
    # Fully masked splits have m = _MASKED and p = 0: their weight exp(m - top) is 0, or 1 times den = 0.
    top = functools.reduce(jnp.maximum, [jnp.max(m, axis=-1) for m, _, _ in parts])[..., None]  # [B, Hkv, G, Tq, 1]
    den = sum(jnp.sum(dn * jnp.exp(m - top), axis=-1) for m, dn, _ in parts)  # [B, Hkv, G, Tq]
    num = sum(jnp.sum(nm * jnp.exp(m - top)[..., None], axis=-2) for m, _, nm in parts)  # [B, Hkv, G, Tq, D]
    den = den[..., None]
    out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)  # [B, Hkv, G, Tq, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, tq, hq, d).astype(q.dtype)


def _decode_attention():
    from pallas_kernels import decode_attention  # lazy, as the memory kernel: pallas_kernels is only needed on demand

    return decode_attention


# Decode attention splits a block's keys into pieces of one of these lengths when it has few query rows (below) and
# the piece divides the block (cache.ring_slots makes large rings multiples of 512).
KEY_SPLITS = (512, 256)
SPLIT_BELOW_ROWS = 1024


def _key_split(n, rows):
    """Keys per split for a block of n keys read by `rows` query rows (B * Hq * Tq): n (no split) unless the rows are
    few and a KEY_SPLITS length divides n into at least 2 pieces."""
    if rows >= SPLIT_BELOW_ROWS:
        return n
    for length in KEY_SPLITS:
        if n % length == 0 and n >= 2 * length:
            return length
    return n


def tiled_block_attention(q, blocks, q_pos, *, window, sinks, tile, scale=None):
    """block_attention over query tiles of `tile` rows (sequentially, lax.map), so the score buffers hold tile x keys
    instead of Tq x keys; the same result (each query's softmax is independent of the other queries). Shapes as in
    block_attention; Tq need not be a multiple of tile (padded queries are computed and dropped)."""
    B, tq = q.shape[:2]
    if tq <= tile:
        return block_attention(q, blocks, q_pos, window=window, sinks=sinks, scale=scale)
    n = -(-tq // tile)
    pad = n * tile - tq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pp = jnp.pad(q_pos, ((0, 0), (0, pad)), mode="edge")
    tiles = lambda a: jnp.moveaxis(a.reshape((B, n, tile) + a.shape[2:]), 1, 0)  # noqa: E731 - [n, B, tile, ...]
    out = jax.lax.map(lambda qt: block_attention(qt[0], blocks, qt[1], window=window, sinks=sinks, scale=scale),
                      (tiles(qp), tiles(pp)))
    return jnp.moveaxis(out, 0, 1).reshape((B, n * tile) + q.shape[2:])[:, :tq]


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


def fuses_memory_decode(mem) -> bool:
    """Whether the fused Pallas decode step (FUSED_MEMORY_DECODE) covers this memory: AHN-DN / AHN-GDN fed the
    evicted tokens. Mamba2 and AllMem keep the XLA path."""
    from ahn_jax.models.memory.deltanet import DeltaNetMemory

    return isinstance(mem, DeltaNetMemory) and not _feeds_all(mem)


def _fused_memory_decode(mem, ring_k, ring_v, gates, state, q, u, slot, evict, block_v=None, columns=None):
    """The evicted-token memory step of a (gated) DeltaNet memory as a Pallas kernel: state in per-sequence form
    [B, 1, Hq, D, D] float32, q [B, 1, Hq, D], u [B, 1, hidden], slot [B] int, evict [B] bool; columns (an int): the
    column form, else block_v picks the one-kernel / split form. Same result as the XLA path of _memory_decode
    (tests/inference/test_fused_memory_decode.py). -> (y [B, 1, Hq*D], state)."""
    from ahn_jax.models.memory.base import compute_dtype
    from pallas_kernels import memory_decode

    shape, cdt = state.shape, compute_dtype(mem.dtype, q)
    common = (state.reshape(shape[0], *shape[2:]), q[:, 0], ring_k, ring_v, gates["beta"], gates.get("g"), slot, evict)
    head = dict(scale=mem.head_dim ** -0.5, norm_eps=mem.norm_eps, compute_dtype=cdt)
    weights = (u[:, 0], mem.g_proj[...], mem.o_norm[...], mem.o_proj[...])
    if columns:
        y, new = memory_decode.fused_delta_decode_columns(*common, *weights, block_v=columns, **head)
    else:
        y, new = memory_decode.fused_delta_decode(*common, *weights, block_v=block_v, **head)
    return y[:, None], new.reshape(shape)


def _memory_decode(mem, ring_k, ring_v, gates, state, q, k, v, u, positions, window, sinks, fused=False):
    """One token per sequence (Tc = 1), AFTER the new token was written: ring_k, ring_v [B, Hkv, R, D] and gates are
    the written buffers (the evicted token t - W is still in its slot: R >= W + 1). Reads only the evicted slot.
    fused: use the Pallas kernel where fuses_memory_decode(mem): True, or ("fused", block_v, columns) as
    _fused_memory_static gives it. Returns (y [B, 1, F], new memory state)."""
    hq = q.shape[2]
    pos = positions[:, 0]
    if _feeds_all(mem):
        new_gates = jax.tree.map(lambda a: a[:, 0], mem.write_gates(u))
        y, state = _vmapped_step(mem, q[:, 0], _repeat_kv(k, hq)[:, 0], _repeat_kv(v, hq)[:, 0], new_gates, u[:, 0],
                                 state)
        return y[:, None], state
    evict = pos >= first_memory_query(window, sinks)
    slot = (evicted_position(pos, window) - sinks) % ring_k.shape[2]  # the slot of the leaving token
    if fused and fuses_memory_decode(mem):
        _, block_v, columns = fused if isinstance(fused, tuple) else (None, None, None)
        if columns == "auto":
            columns = auto_memory_columns(pos.shape[0], hq, q.shape[-1])
        return _fused_memory_decode(mem, ring_k, ring_v, gates, state, q, u, slot, evict, block_v, columns)
    rows = jnp.arange(pos.shape[0])
    k_old, v_old = ring_k[rows, :, slot], ring_v[rows, :, slot]  # [B, Hkv, D]
    g_old = jax.tree.map(lambda g: g[rows, slot], gates)
    y, new_state = _vmapped_step(mem, q[:, 0], _repeat_kv(k_old[:, None], hq)[:, 0],
                                 _repeat_kv(v_old[:, None], hq)[:, 0], g_old, u[:, 0], state)
    state = _select(evict, new_state, state)
    y = jnp.where(evict[:, None], y, 0)
    return y[:, None], state


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
    r = lc.ring_k.shape[2]
    # Source = [ring | chunk]: a leaving token older than the chunk is in its ring slot, a newer one (only when the
    # chunk is longer than the window) at chunk index i - W, i.e. concat index R + i - W.
    idx = jnp.where(i < window, (evicted_position(p0 + i, window) - sinks) % r, r + i - window)

    def source(ring, new):
        return jnp.take(jnp.concatenate([ring, new.astype(ring.dtype)], axis=1), idx, axis=1)

    token_major = lambda kv: jnp.swapaxes(kv, 1, 2)  # noqa: E731 - prefill only: [B, Hkv, R, D] -> [B, R, Hkv, D]
    k_src, v_src = source(token_major(lc.ring_k), k), source(token_major(lc.ring_v), v)
    g_src = jax.tree.map(source, lc.gates, new_gates)
    y, state = mem(q[:, first_valid:], _repeat_kv(k_src, hq), _repeat_kv(v_src, hq), g_src, u[:, first_valid:],
                   initial_state=state0, output_final_state=True)
    y = jnp.concatenate([jnp.zeros((B, first_valid, y.shape[-1]), y.dtype), y], axis=1)
    return y, per_sequence_state(state, B), new_gates


def _write(lc: LayerCache, k, v, new_gates, ring_idx, sink_idx, ring_in_bounds=False):
    """Store the step's tokens (k, v [B, Tc, Hkv, D]; gates leaves [B, Tc, ...]). Only the last min(Tc, R) can still
    be in the ring (distinct slots, no write collisions) and only the first min(Tc, S) can be sinks; ring_idx
    [B, min(Tc, R)] and sink_idx [B, min(Tc, S)] (or [B, 0]: no sink writes) come from _slots (out of range =
    dropped). ring_in_bounds: every ring_idx is a real slot (see _forward)."""
    tc, keep, ns = k.shape[1], ring_idx.shape[1], sink_idx.shape[1]
    ring_k = _store_kv(lc.ring_k, k[:, tc - keep:], ring_idx, ring_in_bounds)
    ring_v = _store_kv(lc.ring_v, v[:, tc - keep:], ring_idx, ring_in_bounds)
    gates = lc.gates
    if gates is not None:
        gates = jax.tree.map(lambda g, n: _store(g, n[:, tc - keep:], ring_idx, ring_in_bounds), gates, new_gates)
    sink_k, sink_v = lc.sink_k, lc.sink_v
    if ns:
        sink_k = _store_kv(sink_k, k[:, :ns], sink_idx)
        sink_v = _store_kv(sink_v, v[:, :ns], sink_idx)
    return LayerCache(sink_k, sink_v, ring_k, ring_v, gates, lc.memory)


def _layer(layer, mem, lc: LayerCache, cache: InferenceCache, x, positions, ring_idx, sink_idx, ring_pos, lengths,
           active, *, decoding, first_valid, q_tile, fused_memory=False, attention_kernel=False):
    """One decoder layer. ring_pos [B, R] / lengths [B]: the slots' positions and token counts the attention sees
    (decode: after this step's write; prefill: before it)."""
    attn = layer.self_attn
    B, tc = positions.shape
    u = layer.input_layernorm(x)
    q, k, v = attn.project(u, positions)
    s = cache.sinks
    feeds_evicted = mem is not None and not _feeds_all(mem)
    sink_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (B, s))
    sink_valid = sink_pos < lengths[:, None]
    if decoding:  # write first, then read only the written buffers (no copy of any buffer; module docstring)
        # A hybrid decode step past the sinks with every sequence active writes a real ring slot: (p - S) % R.
        in_bounds = cache.window is not None and cache.sinks_full and active is None
        new = _write(lc, k, v, mem.write_gates(u) if feeds_evicted else None, ring_idx, sink_idx, in_bounds)
        blocks = [(new.sink_k, new.sink_v, sink_pos, sink_valid), (new.ring_k, new.ring_v, ring_pos, ring_pos >= 0)]
        o = block_attention(q, blocks, positions, window=cache.window, sinks=s, kernel=attention_kernel)
        state, y = lc.memory, None
        if mem is not None:
            y, state = _memory_decode(mem, new.ring_k, new.ring_v, new.gates, lc.memory, q, k, v, u, positions,
                                      cache.window, s, fused=fused_memory)
            if active is not None:  # a sequence that consumed no token keeps its memory state
                state = _select(active, state, lc.memory)
        x = finish_layer(layer, mem, x, o, y)
        return x, new._replace(memory=state)

    heads_major = lambda t: jnp.swapaxes(t, 1, 2).astype(lc.ring_k.dtype)  # noqa: E731 - the chunk as a key block
    blocks = [(lc.sink_k, lc.sink_v, sink_pos, sink_valid), (lc.ring_k, lc.ring_v, ring_pos, ring_pos >= 0),
              (heads_major(k), heads_major(v), positions, jnp.ones((B, tc), bool))]
    o = tiled_block_attention(q, blocks, positions, window=cache.window, sinks=s, tile=q_tile)
    state, new_gates, y = lc.memory, None, None
    if mem is not None:
        y, state, new_gates = _memory_prefill(mem, lc, q, k, v, u, lengths[0], first_valid, cache.window, s)
    x = finish_layer(layer, mem, x, o, y)
    new = _write(lc, k, v, new_gates, ring_idx, sink_idx)
    return x, new._replace(memory=state)


def _forward(graphdef, state, cache: InferenceCache, ids, active, *, decoding, first_valid, all_logits,
             q_tile=PREFILL_QUERY_TILE, fused_memory=False, attention_kernel=False):
    """ids [B, Tc] at positions cache.lengths + i -> (logits [B, Tc or 1, V] float32, new cache). active [B] bool or
    None (decode only): a sequence marked False consumes nothing (its writes are dropped, its state kept)."""
    model = nnx.merge(graphdef, state)
    base, _, memories = model_parts(model, cache.teacher)
    B, tc = ids.shape
    r = cache.ring_size
    positions = cache.lengths[:, None] + jnp.arange(tc, dtype=jnp.int32)[None]
    keep = min(tc, r)
    ring_idx, _ = _slots(cache, positions[:, tc - keep:])
    # sinks_full: every position is past the sinks, so no sink write could land (skip them rather than drop them).
    _, sink_idx = _slots(cache, positions[:, :0 if cache.sinks_full else min(tc, cache.sinks)])
    consumed = jnp.full((B,), tc, jnp.int32)
    if active is not None:
        ring_idx = jnp.where(active[:, None], ring_idx, r)
        sink_idx = jnp.where(active[:, None], sink_idx, cache.sinks)
        consumed = jnp.where(active, consumed, 0)
    ring_pos = _store(cache.ring_pos, positions[:, tc - keep:], ring_idx)
    lengths = cache.lengths + consumed
    seen_pos, seen_len = (ring_pos, lengths) if decoding else (cache.ring_pos, cache.lengths)
    x = base.model.embed_tokens(ids)
    layers = []
    for i, layer in enumerate(base.model.layers):
        x, lc = _layer(layer, memories.get(i), cache.layers[i], cache, x, positions, ring_idx, sink_idx, seen_pos,
                       seen_len, active, decoding=decoding, first_valid=first_valid, q_tile=q_tile,
                       fused_memory=fused_memory, attention_kernel=attention_kernel)
        layers.append(lc)
    h = base.model.norm(x if all_logits else x[:, -1:])
    logits = base.logits(h)
    return logits, cache.replace(layers=tuple(layers), ring_pos=ring_pos, lengths=lengths)


@functools.lru_cache(maxsize=None)
def _jitted(graphdef, state_treedef, backend: str):
    """The jitted step for one model graph, taking the parameters as a flat list of arrays.

    Why not jit(_forward) with a static graphdef and the nnx.State: every call would hash the GraphDef and flatten
    the State in Python, several ms per token for a 36-layer model (measured on CPU), more than the whole step's
    device time at batch 1. Here both are done once per Decoder; jit's C++ path flattens the list."""
    def step(leaves, cache, ids, active, *, decoding, first_valid, all_logits, q_tile, fused_memory=False,
             attention_kernel=False):
        return _forward(graphdef, jax.tree.unflatten(state_treedef, leaves), cache, ids, active, decoding=decoding,
                        first_valid=first_valid, all_logits=all_logits, q_tile=q_tile, fused_memory=fused_memory,
                        attention_kernel=attention_kernel)

    # Donating the cache lets XLA update the ring in place; the CPU backend is left without donations so callers may
    # keep using a cache they passed in (tests compare caches).
    donate = () if backend == "cpu" else (1,)
    return jax.jit(step, static_argnames=("decoding", "first_valid", "all_logits", "q_tile", "fused_memory",
                                          "attention_kernel"),
                   donate_argnums=donate)


@functools.lru_cache(maxsize=None)
def _jitted_greedy(graphdef, state_treedef, backend: str, steps: int, fused_memory=False,
                   attention_kernel: bool = False):
    """`steps` greedy decode steps in one compiled loop (lax.fori_loop): each step feeds the argmax of its logits to
    the next. One dispatch per `steps` tokens instead of one per token (at batch 1 the per-call host work, e.g. XLA
    updating the step's CUDA graph, is of the order of the step's device time)."""
    def loop(leaves, cache, ids):
        state = jax.tree.unflatten(state_treedef, leaves)

        def body(i, carry):
            ids, out, cache = carry
            logits, cache = _forward(graphdef, state, cache, ids, None, decoding=True, first_valid=0,
                                     all_logits=False, fused_memory=fused_memory,
                                     attention_kernel=attention_kernel)
            ids = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
            return ids, out.at[:, i].set(ids[:, 0]), cache

        out = jnp.zeros((ids.shape[0], steps), jnp.int32)
        _, out, cache = jax.lax.fori_loop(0, steps, body, (ids, out, cache))
        return out, cache

    return jax.jit(loop, donate_argnums=() if backend == "cpu" else (1,))


class Decoder:
    """prefill / decode for one model with its graph split once (the generation loop's hot path).

    teacher=True (or a plain QwenForCausalLM): full attention with a growing KV cache of max_length tokens.
    """

    def __init__(self, model, *, teacher: bool = False):
        self.base, self.ahn, self.memories = model_parts(model, teacher)
        self.model, self.teacher = model, teacher or self.ahn is None
        self.graphdef, self.state = nnx.split(model)
        self._leaves, treedef = jax.tree.flatten(self.state)
        self._fn = _jitted(self.graphdef, treedef, jax.default_backend())

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
        # The tile and the kernel switches are read per call (static arguments: changing PREFILL_QUERY_TILE,
        # FUSED_MEMORY_DECODE or DECODE_ATTENTION_KERNEL recompiles, never goes stale).
        return self._fn(self._leaves, cache, ids, active, decoding=decoding, first_valid=first_valid,
                        all_logits=all_logits, q_tile=PREFILL_QUERY_TILE, fused_memory=_fused_memory_static(),
                        attention_kernel=decode_attention_kernel_enabled())

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
        if common >= cache.sinks:  # every sequence holds its sinks: decode steps need no sink writes
            cache = cache.replace(sinks_full=True)
        if not return_all_logits:
            return last, cache
        full = jnp.concatenate(parts, axis=1)
        mask = jnp.arange(full.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
        full = jnp.where(mask[..., None], full, 0)
        return last, jnp.pad(full, ((0, 0), (0, T - full.shape[1]), (0, 0))), cache

    def step(self, token_ids, cache: InferenceCache):
        """decode without input checks, host synchronisation or eager ops around the jitted step (a serving loop's
        and the benchmark's hot path): token_ids [B, 1] int32 device array -> (logits [B, 1, V] float32, cache).
        The caller makes sure a teacher cache has room (decode checks it by reading lengths back, which waits for
        the previous step to finish)."""
        return self._call(cache, token_ids, decoding=True)

    def greedy(self, token_ids, cache: InferenceCache, steps: int):
        """`steps` greedy tokens in one device loop with no host synchronisation inside: token_ids [B, 1] int32, the
        next token to feed -> (generated ids [B, steps] int32, cache). Generated token i is the argmax of the logits
        after feeding token i - 1 (token 0: after token_ids). No stop tokens, no input checks (as `step`)."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"greedy: steps must be an int >= 1, got {steps!r}")
        treedef = jax.tree.structure(self.state)
        fn = _jitted_greedy(self.graphdef, treedef, jax.default_backend(), steps, _fused_memory_static(),
                            decode_attention_kernel_enabled())
        return fn(self._leaves, cache, token_ids)

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
