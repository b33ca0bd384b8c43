"""Sliding-window + sinks attention (spec/AHN.md §1.3-1.4), with GQA and a float32 softmax.

A query at position t sees the keys j < sinks and t - window < j <= t; the predicate is `window.attention_visible`, the
single definition of the window semantics (this module never re-derives it).

Implementations (registered with `ops.dispatch` at the bottom of this file):
  "xla"    blockwise pure JAX, runs everywhere. Each block of `block_q` queries attends to a key slab that covers
           only its window (`block_q + max_window - 1` keys) plus a slab of the first `max_sinks` keys, so memory is
           O(T * (W + S)) and no [T, T] mask or score matrix exists. Blocks run in a `lax.scan` whose body is
           rematerialised, so the backward pass keeps only per-block inputs, not per-block scores.
  "cudnn"  GPU: `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True, local_window_size=(W-1, 0))`
           (DESIGN.md pitfall 8). Only for sinks == 0: the public API returns the window part's log-sum-exp only
           in the output dtype (bf16) and drops its gradient (the cuDNN VJP ignores the residual's cotangent), so a
           log-sum-exp merge with a separate sink part would be neither accurate nor differentiable. With sinks > 0,
           "auto" skips cudnn and an explicit impl="cudnn" raises. UNTESTED ON GPU from this repository's CPU CI.
  "splash" TPU: Pallas splash attention with a causal & (local | sinks) mask computed inside the kernel. Tested
           against "xla" (forward and gradients) in Pallas interpret mode on CPU; UNTESTED ON A REAL TPU.

`window` and `sinks` may be Python ints (static) or traced int32 scalars (sampled per training step without
recompiling). With a traced window the key slab of the xla impl is sized by the static bound `max_window` (default:
the whole causal prefix, which is correct but costs O(T^2) compute); with traced sinks and a finite window, the sink
slab is sized by `max_sinks`, which is then required. Values above the bounds are not checked under jit and give
wrong results, so keep the sampler inside them.

An implementation function has the signature
    fn(q, k, v, *, window, sinks, scale, return_lse, max_window, max_sinks) -> out | (out, lse)
with `window` already an int or a traced scalar (never None) and `scale` a float; it may carry an attribute
`unsupported(q, window, sinks, return_lse) -> str | None` naming why it cannot run a call, which "auto" uses to skip
it and an explicit request turns into a ValueError.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from ahn_jax.ops import dispatch
from ahn_jax.ops.window import attention_visible

DEFAULT_BLOCK_Q = 512
# Finite "minus infinity" for masked scores: keeps exp() and its gradient NaN-free; rows with no visible key are
# zeroed explicitly.
_MASKED = -1e30


def _is_static(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_inputs(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be [B, T, H, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"attention: q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]}) (GQA)")


def _check_window_sinks(window, sinks):
    if _is_static(window) and window < 1:
        raise ValueError(f"attention: window must be >= 1 (the query sees itself), got {window}")
    if _is_static(sinks) and sinks < 0:
        raise ValueError(f"attention: sinks must be >= 0, got {sinks}")


def _masked_softmax_attend(scores, mask, v):
    """Float32 softmax over the last axis of `scores` [..., Tq, Tk] restricted to `mask`, applied to v.

    scores [B, Hkv, G, Tq, Tk] f32, mask broadcastable to it, v [B, Tk, Hkv, D].
    Returns out [B, Tq, Hkv, G, D] f32 and lse [B, Hkv, G, Tq] f32 (zeros / -inf where a row sees no key).
    """
    scores = jnp.where(mask, scores, _MASKED)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # stop_gradient on the shift: it cancels exactly, and skipping its gradient keeps the VJP simple and stable.
    row_max = jax.lax.stop_gradient(row_max)
    expd = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(expd, axis=-1, keepdims=True)
    has_key = denom > 0
    probs = expd / jnp.where(has_key, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = jnp.where(has_key, jnp.log(jnp.where(has_key, denom, 1.0)) + row_max, -jnp.inf)[..., 0]
    return out, lse


def _scores(q_grouped, k, scale):
    """q_grouped [B, Tq, Hkv, G, D], k [B, Tk, Hkv, D] -> float32 scores [B, Hkv, G, Tq, Tk]."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q_grouped, k, preferred_element_type=jnp.float32)
    return s * jnp.float32(scale)


# --------------------------------------------------------------------------------------------------------------- xla

def attention_xla(q, k, v, *, window, sinks=0, scale, return_lse=False, max_window=None, max_sinks=None,
                  block_q=DEFAULT_BLOCK_Q):
    """Blockwise sliding-window + sinks attention in plain JAX.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; window, sinks: int or traced int32 scalar; scale: float.
    Returns out [B, T, Hq, D] in q's dtype, and with `return_lse` also lse [B, T, Hq] float32.
    `max_window` / `max_sinks`: static upper bounds used to size the key slabs when window / sinks are traced.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    bq = max(1, min(int(block_q), T))
    n_blocks = -(-T // bq)
    T_pad = n_blocks * bq

    # Static slab sizes. Window slab: the keys that any window of this block can reach.
    w_bound = window if _is_static(window) else max_window
    win_len = T_pad if w_bound is None else min(T_pad, bq + int(w_bound) - 1)
    full_prefix = win_len >= T_pad
    if full_prefix:
        sink_len = 0  # the window slab already holds every key at or before the block
    elif _is_static(sinks):
        sink_len = min(int(sinks), T_pad)
    elif max_sinks is not None:
        sink_len = min(int(max_sinks), T_pad)
    else:
        raise ValueError("attention(impl='xla'): traced `sinks` with a finite window needs the static bound "
                         "`max_sinks` (the size of the sink key slab)")

    pad = T_pad - T
    if pad:
        # Padded keys sit after every real query, so causality hides them; padded queries are dropped at the end.
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_blocks = q.reshape(B, n_blocks, bq, Hkv, G, D).swapaxes(0, 1)  # [nb, B, bq, Hkv, G, D]
    k_sink, v_sink = k[:, :sink_len], v[:, :sink_len]
    sink_pos = jnp.arange(sink_len, dtype=jnp.int32)

    @jax.checkpoint
    def block(q_blk, blk_idx):
        q_start = blk_idx * bq
        q_pos = q_start + jnp.arange(bq, dtype=jnp.int32)
        # dynamic_slice clamps the start into range; the clamped slab still covers [q_start - W + 1, q_start + bq).
        k_start = jnp.clip(q_start + bq - win_len, 0, T_pad - win_len)
        k_win = jax.lax.dynamic_slice_in_dim(k, k_start, win_len, axis=1)
        v_win = jax.lax.dynamic_slice_in_dim(v, k_start, win_len, axis=1)
        k_pos = k_start + jnp.arange(win_len, dtype=jnp.int32)
        mask = attention_visible(q_pos[:, None], k_pos[None, :], window, sinks)
        if sink_len:
            # Sink keys that already lie inside the window slab are taken from there, never twice.
            sink_mask = attention_visible(q_pos[:, None], sink_pos[None, :], window, sinks) & (sink_pos < k_start)
            k_win = jnp.concatenate([k_sink, k_win], axis=1)
            v_win = jnp.concatenate([v_sink, v_win], axis=1)
            mask = jnp.concatenate([sink_mask, mask], axis=1)
        out, lse = _masked_softmax_attend(_scores(q_blk, k_win, scale), mask, v_win)
        return out.astype(q.dtype), lse

    def step(carry, xs):
        return carry, block(*xs)

    _, (out, lse) = jax.lax.scan(step, None, (q_blocks, jnp.arange(n_blocks, dtype=jnp.int32)))
    out = out.swapaxes(0, 1).reshape(B, T_pad, Hq, D)[:, :T]
    if not return_lse:
        return out
    # lse: [nb, B, Hkv, G, bq] -> [B, T, Hq]
    lse = lse.transpose(1, 0, 4, 2, 3).reshape(B, T_pad, Hq)[:, :T]
    return out, lse


def _xla_impl(q, k, v, *, window, sinks, scale, return_lse, max_window, max_sinks):
    return attention_xla(q, k, v, window=window, sinks=sinks, scale=scale, return_lse=return_lse,
                         max_window=max_window, max_sinks=max_sinks)


# ------------------------------------------------------------------------------------------------------------- cudnn

def _cudnn_unsupported(q, window, sinks, return_lse):
    if not (_is_static(sinks) and sinks == 0):
        return ("cuDNN cannot express sinks without a dense mask, and its log-sum-exp residual is low precision and "
                "has no gradient, so the sink part cannot be merged exactly; use impl='xla' or 'pallas'")
    if not _is_static(window):
        return "cuDNN needs a static (Python int) window"
    if return_lse:
        return "cuDNN returns the log-sum-exp only in the output dtype and without gradient"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bf16/fp16 inputs, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"cuDNN flash attention needs head_dim % 8 == 0 and <= 256, got {q.shape[-1]}"
    return None


def _cudnn_impl(q, k, v, *, window, sinks, scale, return_lse, max_window, max_sinks):
    reason = _cudnn_unsupported(q, window, sinks, return_lse)
    if reason:
        raise ValueError(f"attention(impl='cudnn'): {reason}")
    kwargs = dict(implementation="cudnn", is_causal=True, scale=float(scale))
    if window < q.shape[1]:
        # cuDNN's window is exclusive of the query itself: (W - 1, 0) gives keys (t - W, t] (pitfall 8).
        kwargs["local_window_size"] = (int(window) - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, **kwargs)


_cudnn_impl.unsupported = _cudnn_unsupported


# ------------------------------------------------------------------------------------------------------------ splash

def _splash_unsupported(q, window, sinks, return_lse):
    if not (_is_static(window) and _is_static(sinks)):
        return "splash attention builds its mask ahead of time: window and sinks must be Python ints"
    if return_lse:
        return "the splash wrapper here does not return the log-sum-exp"
    return None


def _splash_impl(q, k, v, *, window, sinks, scale, return_lse, max_window, max_sinks, interpret=False):
    """TPU splash attention (untested on a TPU). Pads T to a multiple of 512; GQA via the MQA kernel per group.

    `interpret=True` runs the Pallas kernel in interpret mode (CPU tests).
    """
    reason = _splash_unsupported(q, window, sinks, return_lse)
    if reason:
        raise ValueError(f"attention(impl='splash'): {reason}")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    T_pad = -(-T // 512) * 512
    w, s = int(window), int(sinks)

    class _SinksOrLocalMask(sm._ComputableMask):  # computed in-kernel: no [T, T] array is built
        def __init__(self, shape):
            def visible(q_ids, kv_ids):
                if isinstance(q_ids, np.ndarray):  # mask preprocessing at trace time: evaluate now, as numpy
                    with jax.ensure_compile_time_eval():
                        return np.asarray(attention_visible(q_ids, kv_ids, w, s))
                return attention_visible(q_ids, kv_ids, w, s)  # inside the kernel
            super().__init__(shape=shape, mask_function=visible)

        def __eq__(self, other):
            return type(self) is type(other) and self.shape == other.shape

        def __hash__(self):
            return hash((type(self), self.shape, w, s))

    mask = sm.MultiHeadMask([_SinksOrLocalMask((T_pad, T_pad)) for _ in range(G)])
    kernel = sk.make_splash_mqa_single_device(mask, interpret=interpret)
    pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))
    qp = (jnp.pad(q, pad) * jnp.asarray(scale, q.dtype)).reshape(B, T_pad, Hkv, G, D)
    kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
    # per (batch, kv head): q [G, T, D], k and v [T, D]
    per_head = jax.vmap(kernel)  # over kv heads
    out = jax.vmap(per_head)(qp.transpose(0, 2, 3, 1, 4), kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3))
    # out [B, Hkv, G, T_pad, D] -> [B, T, Hq, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T_pad, Hq, D)[:, :T].astype(q.dtype)


_splash_impl.unsupported = _splash_unsupported


# -------------------------------------------------------------------------------------------------------- public API

def attention(q, k, v, *, window=None, sinks=0, scale=None, impl="auto", return_lse=False, max_window=None,
              max_sinks=None):
    """Causal attention restricted to the first `sinks` keys and the `window` most recent ones.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D] with Hq % Hkv == 0 (GQA; K/V are never repeated).
    window: None or >= T means full causal; an int >= 1 or a traced int32 scalar otherwise.
    sinks: int >= 0 or a traced int32 scalar. scale: default D ** -0.5.
    max_window / max_sinks: static bounds for traced window / sinks (see the module docstring).
    Returns out [B, T, Hq, D] in q's dtype; with return_lse also lse [B, T, Hq] float32 (natural log of the softmax
    denominator of the scaled scores).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_inputs(q, k, v)
    T = q.shape[1]
    if window is None:
        window = T
    _check_window_sinks(window, sinks)
    if _is_static(window):
        window = min(int(window), T)
    elif max_window is not None and max_window >= T:
        max_window = T
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)

    if impl == "auto":
        # The best-ranked implementation that supports this call (cudnn has no sinks, pallas needs static windows);
        # "xla" supports every case and is always ranked.
        for name in dispatch.ranked("attention"):
            fn = dispatch.resolve("attention", name)
            unsupported = getattr(fn, "unsupported", None)
            if not (unsupported and unsupported(q, window, sinks, return_lse)):
                break
    else:
        fn = dispatch.resolve("attention", impl)
        unsupported = getattr(fn, "unsupported", None)
        reason = unsupported(q, window, sinks, return_lse) if unsupported else None
        if reason:
            raise ValueError(f"attention(impl={impl!r}): {reason}")
    return fn(q, k, v, window=window, sinks=sinks, scale=scale, return_lse=return_lse,
              max_window=max_window, max_sinks=max_sinks)


def cached_attention(q, k, v, q_pos, k_pos, k_valid, *, window, sinks=0, scale=None):
    """Dense attention of new queries against a fixed-size KV cache with arbitrary absolute positions.

    For decode and chunked prefill. q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; q_pos [B, Tq] and k_pos [B, Tk] int
    absolute positions; k_valid [B, Tk] bool (False for empty cache slots). window None means full causal.
    Mask: attention_visible(q_pos, k_pos, window, sinks) & k_valid. A query that sees no key gets zeros.
    Returns [B, Tq, Hq, D] in q's dtype.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"cached_attention: need q [B,Tq,Hq,D], k = v [B,Tk,Hkv,D] with Hq % Hkv == 0; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    for name, arr, shape in (("q_pos", q_pos, (B, Tq)), ("k_pos", k_pos, (B, Tk)), ("k_valid", k_valid, (B, Tk))):
        if tuple(jnp.shape(arr)) != shape:
            raise ValueError(f"cached_attention: {name} must have shape {shape}, got {tuple(jnp.shape(arr))}")
    if window is None:
        window = jnp.iinfo(jnp.int32).max
    _check_window_sinks(window, sinks)
    scale = float(D ** -0.5 if scale is None else scale)
    q_pos = jnp.asarray(q_pos, jnp.int32)
    k_pos = jnp.asarray(k_pos, jnp.int32)
    mask = attention_visible(q_pos[:, :, None], k_pos[:, None, :], window, sinks) & jnp.asarray(k_valid)[:, None, :]
    q_grouped = q.reshape(B, Tq, Hkv, Hq // Hkv, D)
    out, _ = _masked_softmax_attend(_scores(q_grouped, k, scale), mask[:, None, None], v)
    return out.reshape(B, Tq, Hq, D).astype(q.dtype)


def _pallas_unsupported(q, window, sinks, return_lse):
    if not (_is_static(window) and _is_static(sinks)):
        return "the Pallas kernel needs static (Python int) window and sinks"
    return None


def _pallas_impl(q, k, v, *, window, sinks, scale, return_lse, max_window, max_sinks):
    # pallas_kernels imports only jax; it is loaded here, on first use, so ops stays light to import.
    from pallas_kernels.swa_attention import swa_attention

    return swa_attention(q, k, v, window=int(window), sinks=int(sinks), scale=scale, return_lse=return_lse)


_pallas_impl.unsupported = _pallas_unsupported

dispatch.register("attention", "xla", "ahn_jax.ops.attention:_xla_impl", {"cpu": 0, "gpu": 0, "tpu": 0})
# GPU ranking (benchmarks/RESULTS.md): cuDNN (sinks == 0 only) first: on the H100 the Mosaic kernels with 128 sinks
# run at 0.93-1.00x its forward and 1.00-1.07x its forward+backward (W 1024-8192; it has no sinks), the Triton kernels
# of other GPUs at 1.2-1.4x. Every call with sinks goes to the Pallas kernel (cuDNN plus a sink merge would not be
# differentiable: see "cudnn" above), with O(T (W+S)) cost. Not registered for TPU: it has never run there.
dispatch.register("attention", "pallas", "ahn_jax.ops.attention:_pallas_impl", {"gpu": 0.5, "cpu": None})
dispatch.register("attention", "cudnn", "ahn_jax.ops.attention:_cudnn_impl", {"gpu": 1})
dispatch.register("attention", "splash", "ahn_jax.ops.attention:_splash_impl", {"tpu": 1})
