"""AllMem's TTT-MLP memory (spec/ALLMEM.md §3.3-3.5, §4.3, §5) as a pure-JAX op: parallel chunked form and decode.

Per head, the state is a SwiGLU fast-weight MLP with residual, f_W(u) = u + W1 (SiLU(W0 u) * (W2 u)), updated once per
chunk by a gradient step on a key -> value loss (apply-then-update: chunk c is read with the weights written after
chunk c-1). Chunk boundaries are absolute multiples of `chunk_size` counted from position 0 of the call (an
`initial_state` must therefore sit on a chunk boundary). A trailing partial chunk is read but never written: it stays
"pending" and the decode form (`ttt_mlp_prefill` -> `ttt_mlp_step`) finishes it, so prefill + decode == parallel.

The chunk math (read, manual inner gradients, write) lives once in `ttt_grads.py`; both forms call it.

Shapes: q, k [B, T, H, dk]; v [B, T, H, dv] with dv == dk; lr [B, T, H, 3] >= 0 (per-token rates for W0, W1, W2);
momentum [B, T, H] in (0, 1) (averaged per chunk); forget [B, T, H] in [0, 1) or None (gamma_c = 1 - chunk mean);
w0 = (W0 [H, dh, dk], W1 [H, dv, dh], W2 [H, dh, dk]) float32, the learned initial fast weights whose row norms are
the weight-norm targets rho; state = TTTState(weights triple, momentum triple) float32 [B, H, out, in].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ahn_jax.ops import dispatch
from ahn_jax.ops.ttt_grads import INNER_LOSSES, RENORMS, TTTState, chunk_write, read, row_norms

__all__ = ["TTTState", "TTTPending", "ttt_mlp", "ttt_mlp_prefill", "ttt_mlp_step", "ttt_mlp_init_state",
           "ttt_mlp_init_pending"]


class TTTPending(NamedTuple):
    """The current, not yet written chunk for decoding: fixed-size buffers of `chunk_size` slots.

    k [B, C, H, dk], v [B, C, H, dv] (input dtype), lr [B, C, H, 3], momentum [B, C, H], forget [B, C, H] or None
    (float32), count int32 scalar = number of valid slots (the slot of position `pos` is pos % C).
    """

    k: jax.Array
    v: jax.Array
    lr: jax.Array
    momentum: jax.Array
    forget: jax.Array | None
    count: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# input checks (names the bad tensor; all static, so they cost nothing under jit)


def _check_w0(w0):
    if not isinstance(w0, (tuple, list)) or len(w0) != 3:
        raise ValueError("w0 must be a triple (W0 [H, dh, dk], W1 [H, dv, dh], W2 [H, dh, dk])")
    a, b, c = (jnp.shape(w) for w in w0)
    if len(a) != 3 or len(b) != 3 or a != tuple(c) or b != (a[0], a[2], a[1]):
        raise ValueError(f"w0 shapes must be W0 [H, dh, dk], W1 [H, dk, dh], W2 [H, dh, dk] (dv == dk for the "
                         f"residual); got W0 {a}, W1 {b}, W2 {c}")
    return a  # (H, dh, dk)


def _check_options(chunk_size, inner_loss, renorm):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive Python int, got {chunk_size!r}")
    if inner_loss not in INNER_LOSSES:
        raise ValueError(f"inner_loss must be one of {INNER_LOSSES}, got {inner_loss!r}")
    if renorm not in RENORMS:
        raise ValueError(f"renorm must be one of {RENORMS}, got {renorm!r}")


def _check_tokens(q, k, v, lr, momentum, forget, w0, lead):
    """`lead` is the leading shape every token tensor shares: (B, T, H) in the parallel form, (B, H) in decode."""
    heads, _, dk = _check_w0(w0)
    want = {"q": lead + (dk,), "k": lead + (dk,), "v": lead + (dk,), "lr": lead + (3,), "momentum": lead}
    if forget is not None:
        want["forget"] = lead
    got = {"q": q, "k": k, "v": v, "lr": lr, "momentum": momentum, "forget": forget}
    for name, shape in want.items():
        if jnp.shape(got[name]) != shape:
            raise ValueError(f"ttt_mlp: {name} has shape {jnp.shape(got[name])}, expected {shape} "
                             f"(heads {heads} and dk {dk} come from w0; dv must equal dk)")
    if lead[-1] != heads:
        raise ValueError(f"ttt_mlp: inputs have {lead[-1]} heads but w0 has {heads}")


def _check_state(state, batch, w0, name="initial_state"):
    if not isinstance(state, TTTState):
        raise ValueError(f"{name} must be a TTTState (see ttt_mlp_init_state), got {type(state).__name__}")
    for part in ("weights", "momentum"):
        for i, (s, w) in enumerate(zip(getattr(state, part), w0)):
            if jnp.shape(s) != (batch,) + jnp.shape(w):
                raise ValueError(f"{name}.{part}[{i}] has shape {jnp.shape(s)}, expected {(batch,) + jnp.shape(w)}")


def _l2norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# state constructors


def ttt_mlp_init_state(w0, batch):
    """The state before any token: W~ = w0 broadcast over the batch, zero momentum (float32 [B, H, out, in])."""
    _check_w0(w0)
    weights = tuple(jnp.broadcast_to(jnp.asarray(w, jnp.float32)[None], (batch,) + jnp.shape(w)) for w in w0)
    return TTTState(weights, tuple(jnp.zeros_like(w) for w in weights))


def ttt_mlp_init_pending(w0, batch, chunk_size, dtype=jnp.float32, with_forget=False):
    """An empty pending-chunk buffer (count 0) for decoding from a chunk boundary; k/v stored in `dtype`."""
    heads, _, dk = _check_w0(w0)
    lead = (batch, chunk_size, heads)
    return TTTPending(k=jnp.zeros(lead + (dk,), dtype), v=jnp.zeros(lead + (dk,), dtype),
                      lr=jnp.zeros(lead + (3,), jnp.float32), momentum=jnp.zeros(lead, jnp.float32),
                      forget=jnp.zeros(lead, jnp.float32) if with_forget else None,
                      count=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# parallel (chunked) form


def _ttt_chunk(q, k, v, lr, momentum, w0, *, chunk_size, inner_loss="mse", renorm="read_raw", forget=None,
               initial_state=None, output_final_state=False, detach_inner_grads=False, checkpoint_chunks=True):
    """Chunked apply-then-update: a lax.scan over the chunks that get written, then a read of the trailing tokens.

    Written chunks: every complete chunk when output_final_state (the state decode continues from), otherwise all
    but the last chunk (its write would only feed tokens that do not exist). Returns (o [B, T, H, dv] in q.dtype,
    TTTState or None). Inputs are validated by `ttt_mlp`.
    """
    batch, seq, heads, dk = q.shape
    c = chunk_size
    n_chunks = -(-seq // c)
    n_write = seq // c if output_final_state else max(n_chunks - 1, 0)
    t_write = n_write * c
    if initial_state is None:
        state = ttt_mlp_init_state(w0, batch)
    else:  # the scan carry must keep one dtype
        state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), initial_state)
    rho = row_norms(w0)

    def body(carry, xs):
        qc, kc, vc, lrc, mc, fc = xs
        out = read(carry.weights, qc)  # read with W~_{c-1}, before this chunk's write
        new = chunk_write(carry, kc, vc, lrc, mc, fc, rho, renorm=renorm, inner_loss=inner_loss,
                          detach_inner_grads=detach_inner_grads)
        return new, out

    if checkpoint_chunks:
        # Backward recomputes each chunk's internals from its carry: residuals are one state per chunk, never
        # per-token intermediates (DESIGN.md pitfall 11).
        body = jax.checkpoint(body, prevent_cse=False)

    outs = []
    if n_write:
        def to_chunks(x):
            if x is None:
                return None
            x = x[:, :t_write]
            return jnp.swapaxes(x.reshape((batch, n_write, c) + x.shape[2:]), 0, 1)

        xs = tuple(to_chunks(x) for x in (q, k, v, lr, momentum, forget))
        state, o_chunks = jax.lax.scan(body, state, xs)
        outs.append(jnp.swapaxes(o_chunks, 0, 1).reshape(batch, t_write, heads, -1))
    if t_write < seq:
        outs.append(read(state.weights, q[:, t_write:]))
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o.astype(q.dtype), (state if output_final_state else None)


def ttt_mlp(q, k, v, lr, momentum, w0, *, chunk_size, inner_loss="mse", renorm="read_raw", forget=None,
            initial_state=None, output_final_state=False, normalize_qk=False, detach_inner_grads=False,
            checkpoint_chunks=True, impl="auto"):
    """AllMem's TTT-MLP memory over a whole sequence (shapes in the module docstring).

    q, k must be L2-normalised per head by the caller, or pass normalize_qk=True. inner_loss "mse" (default) or
    "dot"; renorm "read_raw" (default: read raw W~, renormalise before the gradient) or "post_write" (LaCT).
    `initial_state` is taken to sit on a chunk boundary. With output_final_state, the returned TTTState is the state
    after the last COMPLETE chunk; the trailing T % chunk_size tokens are not written (use `ttt_mlp_prefill` to also
    get them as a pending buffer). Outer gradients flow through the inner updates; `detach_inner_grads=True` cuts
    them (ablation only). `checkpoint_chunks=False` keeps per-chunk residuals (testing only).
    Returns (o [B, T, H, dv] in q.dtype, final_state or None).
    """
    _check_options(chunk_size, inner_loss, renorm)
    if jnp.ndim(q) != 4:
        raise ValueError(f"ttt_mlp: q must be [B, T, H, dk], got shape {jnp.shape(q)}")
    batch, seq, _, _ = jnp.shape(q)
    if seq < 1:
        raise ValueError(f"ttt_mlp: q has no tokens (shape {jnp.shape(q)}); decode from ttt_mlp_init_state instead")
    _check_tokens(q, k, v, lr, momentum, forget, w0, tuple(jnp.shape(q)[:3]))
    if initial_state is not None:
        _check_state(initial_state, batch, w0)
    if normalize_qk:
        q, k = _l2norm(q), _l2norm(k)
    fn = dispatch.resolve("ttt_mlp", impl)
    return fn(q, k, v, lr, momentum, w0, chunk_size=chunk_size, inner_loss=inner_loss, renorm=renorm,
              forget=forget, initial_state=initial_state, output_final_state=output_final_state,
              detach_inner_grads=detach_inner_grads, checkpoint_chunks=checkpoint_chunks)


# ----------------------------------------------------------------------------------------------------------------
# decode form


def ttt_mlp_prefill(q, k, v, lr, momentum, w0, *, chunk_size, inner_loss="mse", renorm="read_raw", forget=None,
                    initial_state=None, normalize_qk=False, pending_dtype=None, impl="auto"):
    """Parallel run over a prompt plus what decode needs: (o, state after the last complete chunk, TTTPending).

    The pending buffer holds the trailing T % chunk_size tokens (k, v, lr, momentum, forget) in its first slots;
    decoding continues with `ttt_mlp_step(..., pos=T)`. k/v are stored in `pending_dtype` (default k.dtype).
    """
    if normalize_qk:
        _check_tokens(q, k, v, lr, momentum, forget, w0, tuple(jnp.shape(q)[:3]))
        q, k = _l2norm(q), _l2norm(k)
    o, state = ttt_mlp(q, k, v, lr, momentum, w0, chunk_size=chunk_size, inner_loss=inner_loss, renorm=renorm,
                       forget=forget, initial_state=initial_state, output_final_state=True, impl=impl)
    batch, seq = q.shape[:2]
    tail = seq % chunk_size
    start = seq - tail
    pending = ttt_mlp_init_pending(w0, batch, chunk_size, pending_dtype or k.dtype, with_forget=forget is not None)

    def fill(buf, x):
        return buf.at[:, :tail].set(x[:, start:].astype(buf.dtype))

    pending = TTTPending(k=fill(pending.k, k), v=fill(pending.v, v), lr=fill(pending.lr, lr),
                         momentum=fill(pending.momentum, momentum),
                         forget=None if forget is None else fill(pending.forget, forget),
                         count=jnp.asarray(tail, jnp.int32))
    return o, state, pending


def ttt_mlp_step(q_t, k_t, v_t, lr_t, mom_t, state, pending, pos, w0, *, chunk_size, inner_loss="mse",
                 renorm="read_raw", forget_t=None, normalize_qk=False, detach_inner_grads=False):
    """One decode token at absolute position `pos` (int or traced int32 scalar): (o_t, state, pending).

    q_t, k_t, v_t [B, H, dk]; lr_t [B, H, 3]; mom_t, forget_t [B, H]. Reads with the state after the last completed
    chunk, stores the token in slot pos % chunk_size, and when that completes the chunk ((pos+1) % C == 0) runs the
    same chunk write as the parallel form (lax.cond, fixed shapes). o_t [B, H, dv] in q_t.dtype.
    """
    _check_options(chunk_size, inner_loss, renorm)
    if jnp.ndim(q_t) != 3:
        raise ValueError(f"ttt_mlp_step: q_t must be [B, H, dk], got shape {jnp.shape(q_t)}")
    batch = jnp.shape(q_t)[0]
    _check_tokens(q_t, k_t, v_t, lr_t, mom_t, forget_t, w0, tuple(jnp.shape(q_t)[:2]))
    _check_state(state, batch, w0, name="state")
    if pending.k.shape[1] != chunk_size:
        raise ValueError(f"pending buffer has {pending.k.shape[1]} slots but chunk_size is {chunk_size}")
    if (forget_t is None) != (pending.forget is None):
        raise ValueError("forget_t must be given exactly when the pending buffer was made with_forget")
    if normalize_qk:
        q_t, k_t = _l2norm(q_t), _l2norm(k_t)
    state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state)

    o_t = read(state.weights, q_t[:, None])[:, 0].astype(q_t.dtype)
    slot = jnp.asarray(pos, jnp.int32) % chunk_size

    def put(buf, x):
        return buf.at[:, slot].set(x.astype(buf.dtype))

    pending = TTTPending(k=put(pending.k, k_t), v=put(pending.v, v_t), lr=put(pending.lr, lr_t),
                         momentum=put(pending.momentum, mom_t),
                         forget=None if forget_t is None else put(pending.forget, forget_t), count=slot + 1)

    def write(st, pd):
        new = chunk_write(st, pd.k, pd.v, pd.lr, pd.momentum, pd.forget, row_norms(w0), renorm=renorm,
                          inner_loss=inner_loss, detach_inner_grads=detach_inner_grads)
        return new, pd._replace(count=jnp.zeros((), jnp.int32))

    def keep(st, pd):
        return st, pd

    state, pending = jax.lax.cond(slot + 1 == chunk_size, write, keep, state, pending)
    return o_t, state, pending


dispatch.register("ttt_mlp", "chunk", "ahn_jax.ops.ttt:_ttt_chunk", {"cpu": 1, "gpu": 1, "tpu": 1})
