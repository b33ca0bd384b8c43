"""Decode attention partials (one new token per sequence) over one key block of a cache, as one Pallas kernel
(flash-decoding; issue 5).

The XLA form (ahn_jax/inference/decode.py: block_attention with one query row) is a dozen small kernels per block and
layer (scores, mask, max, exp, sum, weighted values, pads and concatenates of the key splits); at batch 1 their launch
cost is of the order of the bytes they read. Here one program per (sequence b, KV head h, split j of `split` keys):

    s     = scale * q_g . k_n            for the G query heads g of KV head h and the split's keys n (float32 sums)
    mask  = valid_n & k_pos_n <= q_pos & (q_pos - k_pos_n < window | k_pos_n < sinks)   (ops.window.attention_visible)
    m     = max_n s (masked: MASKED)      p = exp(s - m) (masked: 0)      l = sum_n p      acc = p @ v (p in v's dtype)

and the caller merges the splits (and other blocks) with one global max, as block_attention does. Several blocks (a
cache's sinks and its ring) go through one launch: the grid's split axis runs over every block's splits in turn. The
G query rows are padded to 16 (the smallest Triton dot). Forward only: decode is never differentiated. Imports only
jax/numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import F32, pallas_module, triton_params

MASKED = -1e30  # finite "minus infinity" (as decode._MASKED): exp(MASKED - m) is 0 without NaNs
MIN_ROWS = 16  # the smallest Triton dot: the G query heads of a KV head are padded up to this
NUM_WARPS = 4
SPLITS = (512, 256, 128, 64, 32, 16)  # keys per program, the largest dividing the block (powers of two for Triton)
# Bytes of one program's key (or value) tile at most: 512-key splits at D 128 (the float32 check's 256 KB tiles)
# asked the H100 for 288 KB of shared memory (227 KB available); 64 KB tiles (bf16: 256 keys at D 128, float32:
# 128) compile and run.
MAX_TILE_BYTES = 64 * 1024


def key_split(n: int, d: int = 128, itemsize: int = 2):
    """Keys per program for a block of n keys of d elements of `itemsize` bytes: the largest of SPLITS dividing n
    whose tile fits MAX_TILE_BYTES, or None (no kernel: the caller keeps the XLA form; also for a head size that is
    not a power of two >= 16, which Triton's loads and dots cannot take whole)."""
    if d < MIN_ROWS or d & (d - 1):
        return None
    for split in SPLITS:
        if n % split == 0 and split * d * itemsize <= MAX_TILE_BYTES:
            return split
    return None


def _attend_split(qpos_ref, q_ref, k_ref, v_ref, kpos_ref, kvalid_ref, out_refs, b, h, j, out_j, *, split, window,
                  sinks, scale):
    """Split j of one block -> row max, sum of exp and weighted values, stored at split index out_j."""
    m_ref, l_ref, acc_ref = out_refs
    keys = pallas_module().ds(j * split, split)
    q = q_ref[b, h, :, :]  # [Gp, D]
    k = k_ref[b, h, keys, :]  # [split, D]
    s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), preferred_element_type=F32) * scale
    k_pos = kpos_ref[b, keys]
    q_pos = qpos_ref[b]
    visible = (kvalid_ref[b, keys] != 0) & (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < sinks))
    s = jnp.where(visible[None, :], s, MASKED)
    m = jnp.max(s, axis=1)
    p = jnp.where(visible[None, :], jnp.exp(s - m[:, None]), 0.0)
    v = v_ref[b, h, keys, :]
    acc = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    m_ref[b, h, out_j, :] = m
    l_ref[b, h, out_j, :] = jnp.sum(p, axis=1)
    acc_ref[b, h, out_j, :, :] = acc


def _kernel(qpos_ref, q_ref, *refs, plan, window, sinks, scale):
    """plan: per block (first split index, splits, keys per split); refs: each block's k, v, k_pos, k_valid, then
    the outputs m, l, acc. Program (b, h, j) handles the block whose split range holds j."""
    pl = pallas_module()
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    out_refs = refs[4 * len(plan):]
    for i, (first, ns, split) in enumerate(plan):
        block = refs[4 * i:4 * i + 4]
        run = functools.partial(_attend_split, qpos_ref, q_ref, *block, out_refs, b, h, j - first, j, split=split,
                                window=window, sinks=sinks, scale=scale)
        if len(plan) == 1:
            run()
        else:
            pl.when((j >= first) & (j < first + ns))(run)


def decode_attention_partials(q, k, v, k_pos, k_valid, q_pos, *, window, sinks, scale, split=None, interpret=None):
    """Per-split softmax partials of one query token per sequence over one key block.

    q [B, Hkv, G, D] (the token's query heads grouped by KV head: query head h*G + g); k, v [B, Hkv, N, D]; k_pos
    [B, N] int absolute positions; k_valid [B, N] bool; q_pos [B] int; window: int (a huge int for full causal
    attention); sinks int; split: keys per program (dividing N; None: key_split(N, D, itemsize)). interpret None:
    interpret mode off the GPU. Returns (m, l [B, Hkv, N / split, G], acc [B, Hkv, N / split, G, D]) float32: each split's row max of the
    masked scores (MASKED where it sees no key), sum of exp(score - m) and exp-weighted sum of values.
    """
    return decode_attention_partials_blocks(q, [(k, v, k_pos, k_valid)], q_pos, window=window, sinks=sinks,
                                            scale=scale, splits=None if split is None else [split],
                                            interpret=interpret)


def decode_attention_partials_blocks(q, blocks, q_pos, *, window, sinks, scale, splits=None, interpret=None):
    """decode_attention_partials over several key blocks (e.g. a cache's sinks and its ring) in ONE kernel: blocks is
    a sequence of (k, v, k_pos, k_valid) as there (N may differ per block); splits: keys per program per block
    (None: key_split of each). The partials of every block's splits come back concatenated along the split axis
    (block order), ready for one merge: one launch per layer instead of one per block (at batch 1 a 128-key sink
    block alone took ~4.6 us per layer on the H100)."""
    bsz, hkv, g, d = q.shape
    if not blocks:
        raise ValueError("decode_attention_partials: no key blocks")
    plan, args, total = [], [], 0
    for i, (k, v, k_pos, k_valid) in enumerate(blocks):
        n = k.shape[2]
        if k.shape != (bsz, hkv, n, d) or v.shape != k.shape or k_pos.shape != (bsz, n) \
                or k_valid.shape != (bsz, n) or q_pos.shape != (bsz,):
            raise ValueError(f"decode_attention_partials: need q [B, Hkv, G, D] = {q.shape}, k = v [B, Hkv, N, D], "
                             f"k_pos = k_valid [B, N], q_pos [B]; got k {k.shape}, v {v.shape}, k_pos {k_pos.shape}, "
                             f"k_valid {k_valid.shape}, q_pos {q_pos.shape}")
        split = key_split(n, d, max(k.dtype.itemsize, q.dtype.itemsize)) if splits is None else splits[i]
        if split is None or n % split:
            raise ValueError(f"decode_attention_partials: no key split of {SPLITS} divides N={n} in tiles of <= "
                             f"{MAX_TILE_BYTES} bytes (got split={split})")
        plan.append((total, n // split, split))
        total += n // split
        args += [k, v, k_pos.astype(jnp.int32), k_valid.astype(jnp.int32)]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    gp = max(MIN_ROWS, 1 << (g - 1).bit_length())
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0))) if gp != g else q
    window = min(int(window), jnp.iinfo(jnp.int32).max)
    kernel = functools.partial(_kernel, plan=tuple(plan), window=window, sinks=int(sinks), scale=float(scale))
    m, l, acc = pallas_module().pallas_call(
        kernel, grid=(bsz, hkv, total), interpret=interpret, name="decode_attention",
        out_shape=(jax.ShapeDtypeStruct((bsz, hkv, total, gp), F32), jax.ShapeDtypeStruct((bsz, hkv, total, gp), F32),
                   jax.ShapeDtypeStruct((bsz, hkv, total, gp, d), F32)),
        compiler_params=triton_params(NUM_WARPS, 1))(q_pos.astype(jnp.int32), qp, *args)
    return m[..., :g], l[..., :g], acc[..., :g, :]
