"""AllMem's TTT-MLP memory branch (spec/ALLMEM.md §3, defaults of §10), on the shared memory contract (base.py).

With n = the prenormed hidden state (input_layernorm output) of a token, per memory head h (one per attention q head):
    k^ = L2(qk_norm(n theta_K)_h),  v = (n theta_V)_h,  q^ = L2(qk_norm(n theta_Q)_h)        (own projections, NoPE)
    lr_t = softplus(n w_lr + b_lr) [H, 3]     b_lr = softplus^-1(eta_base), w_lr = 0 at init  (per token, per matrix)
    mom_t = sigmoid(n w_mom + b_mom) [H]      b_mom = logit(momentum_init), w_mom = 0 at init (averaged per chunk)
    o = TTT-MLP fast-weight memory (ahn_jax/ops/ttt.py: apply-then-update chunks, SwiGLU + residual fast net)
    y = alpha * (concat_h o_h) theta_O        alpha [D] per-channel, 0 at init => y == 0, the SWA + sinks model
The hybrid layer adds y to the residual stream: x + a + y (output_site "residual").

Switches: qkv_source "own" (Option A: theta_Q/K/V/O initialised from the frozen attention with `init_from_attention`,
KV heads repeated, Qwen3's q_norm/k_norm applied before the L2 norm) or "attn_pre_rope" (q, k, v handed in by the
caller, the frozen attention's pre-RoPE, GQA-repeated tensors, with a learnable per-channel scale/offset on q and k,
LaCT-style); inner_loss "mse" | "dot"; renorm "read_raw" | "post_write"; feed "all" (every token, read and written in
place; `parallel_all`) | "evicted" (AHN alignment done by the hybrid layer); chunk_size; hidden_mult (dh = mult*dk).

Gates (what a decode cache stores per token): {"lr", "momentum"} plus, for "own", the written token's {"k", "v"}.
State: {"fast": TTTState (weights, momentum triples [B, H, out, in] f32), "pending": TTTPending (the current chunk),
"pos": int32 step counter}. Chunk boundaries are multiples of chunk_size counted from the first memory step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ahn_jax.models.memory.base import (
    FrozenCopy, Memory, MemoryParam, check_hidden, compute_dtype, l2_normalize, normal_param, project,
    rms_normalize, inverse_softplus)


def _ttt_ops():
    from ahn_jax.ops import ttt

    return ttt


class TTTMLPMemory(Memory):
    """AllMem memory branch. Parameters (MemoryParam, float32):
    own source: q_proj, k_proj, v_proj [D, H*dk], o_proj [H*dk, D]; attn_pre_rope: q_scale, q_offset, k_scale,
    k_offset [H*dk] and o_proj; always lr_proj [D, 3H], lr_bias [3H], mom_proj [D, H], mom_bias [H],
    w0_0 [H, dh, dk], w0_1 [H, dk, dh], w0_2 [H, dh, dk] (learned initial fast weights), alpha [D]."""

    kind = "ttt_mlp"
    output_site = "residual"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 128, *, chunk_size: int = 2048,
                 impl: str = "auto", dtype=None, qkv_source: str = "own", inner_loss: str = "mse",
                 renorm: str = "read_raw", feed: str = "all", hidden_mult: int = 2, eta_base: float = 1e-2,
                 momentum_init: float = 0.9, fw_init_gain: float = 0.5, qk_norm_eps: float = 1e-6,
                 rngs: nnx.Rngs):
        if qkv_source not in ("own", "attn_pre_rope"):
            raise ValueError(f"TTTMLPMemory: qkv_source={qkv_source!r}; choose 'own' or 'attn_pre_rope'")
        if feed not in ("all", "evicted"):
            raise ValueError(f"TTTMLPMemory: feed={feed!r}; choose 'all' or 'evicted'")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype
        self.qkv_source, self.inner_loss, self.renorm, self.feed = qkv_source, inner_loss, renorm, feed
        self.qk_norm_eps = qk_norm_eps
        h, dk, width = num_heads, head_dim, num_heads * head_dim
        dh = hidden_mult * head_dim
        if qkv_source == "own":
            self.q_proj = normal_param(rngs, (hidden_size, width))
            self.k_proj = normal_param(rngs, (hidden_size, width))
            self.v_proj = normal_param(rngs, (hidden_size, width))
            # Qwen3's frozen per-head q_norm / k_norm weights (ones until init_from_attention copies them).
            self.q_norm = FrozenCopy(jnp.ones((dk,), jnp.float32))
            self.k_norm = FrozenCopy(jnp.ones((dk,), jnp.float32))
            self.use_qk_norm = False
        else:
            self.q_scale = MemoryParam(jnp.ones((width,), jnp.float32))
            self.q_offset = MemoryParam(jnp.zeros((width,), jnp.float32))
            self.k_scale = MemoryParam(jnp.ones((width,), jnp.float32))
            self.k_offset = MemoryParam(jnp.zeros((width,), jnp.float32))
        self.o_proj = normal_param(rngs, (width, hidden_size))
        # Zero gate weights: at init every token gets lr = eta_base and momentum = momentum_init.
        self.lr_proj = MemoryParam(jnp.zeros((hidden_size, 3 * h), jnp.float32))
        self.lr_bias = MemoryParam(jnp.full((3 * h,), inverse_softplus(eta_base), jnp.float32))
        self.mom_proj = MemoryParam(jnp.zeros((hidden_size, h), jnp.float32))
        self.mom_bias = MemoryParam(jnp.full((h,), math.log(momentum_init / (1 - momentum_init)), jnp.float32))
        # Fast-weight init: N(0, 1/sqrt(fan_in)) * gain (LaCT's fw_init_gain), layout [H, out, in].
        self.w0_0 = MemoryParam(fw_init_gain * jax.random.normal(rngs.params(), (h, dh, dk)) / math.sqrt(dk))
        self.w0_1 = MemoryParam(fw_init_gain * jax.random.normal(rngs.params(), (h, dk, dh)) / math.sqrt(dh))
        self.w0_2 = MemoryParam(fw_init_gain * jax.random.normal(rngs.params(), (h, dh, dk)) / math.sqrt(dk))
        # alpha = 0: the hybrid starts as exactly the sliding window + sinks model (spec/ALLMEM.md §3.6).
        self.alpha = MemoryParam(jnp.zeros((hidden_size,), jnp.float32))

    @property
    def out_features(self) -> int:
        return self.hidden_size

    def init_from_attention(self, q_proj, k_proj, v_proj, o_proj, q_norm=None, k_norm=None):
        """Option A warm start from the frozen attention (our [in, out] layout, no biases):
        q_proj [D, Hq*dk], k_proj / v_proj [D, Hkv*dk] (each KV head repeated Hq/Hkv times, query head h uses KV
        head h // (Hq/Hkv)), o_proj [Hq*dk, D]; q_norm / k_norm [dk] (Qwen3) switch the per-head norm on."""
        if self.qkv_source != "own":
            raise ValueError("TTTMLPMemory.init_from_attention: only qkv_source='own' has its own projections")
        h, dk, d = self.num_heads, self.head_dim, self.hidden_size
        for name, w, shape in (("q_proj", q_proj, (d, h * dk)), ("o_proj", o_proj, (h * dk, d))):
            if tuple(w.shape) != shape:
                raise ValueError(f"TTTMLPMemory.init_from_attention: {name} must be {shape}; got {tuple(w.shape)}")
        for name, w in (("k_proj", k_proj), ("v_proj", v_proj)):
            if w.ndim != 2 or w.shape[0] != d or w.shape[1] % dk or h % (w.shape[1] // dk):
                raise ValueError(f"TTTMLPMemory.init_from_attention: {name} must be [{d}, Hkv*{dk}] with Hkv dividing "
                                 f"{h}; got {tuple(w.shape)}")

        def repeat_heads(w):
            hkv = w.shape[1] // dk
            return jnp.repeat(jnp.asarray(w, jnp.float32).reshape(d, hkv, dk), h // hkv, axis=1).reshape(d, h * dk)

        # Copies, never views: with a float32 base, asarray would hand back the frozen weight's own buffer, and the
        # trainer donates the memory's buffers each step (a donated frozen weight fails the step on GPU).
        self.q_proj[...] = jnp.array(q_proj, jnp.float32, copy=True)
        self.k_proj[...] = jnp.array(repeat_heads(k_proj), copy=True)
        self.v_proj[...] = jnp.array(repeat_heads(v_proj), copy=True)
        self.o_proj[...] = jnp.array(o_proj, jnp.float32, copy=True)
        if (q_norm is None) != (k_norm is None):
            raise ValueError("TTTMLPMemory.init_from_attention: pass both q_norm and k_norm, or neither")
        if q_norm is not None:
            self.q_norm[...] = jnp.array(q_norm, jnp.float32, copy=True).reshape(dk)
            self.k_norm[...] = jnp.array(k_norm, jnp.float32, copy=True).reshape(dk)
            self.use_qk_norm = True

    # --- projections -----------------------------------------------------------------------------------------------
    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _own_qk(self, u, weight, norm, dtype):
        x = self._heads(project(u, weight[...], dtype=dtype))
        if self.use_qk_norm:
            x = rms_normalize(x, self.qk_norm_eps) * norm[...]
        return l2_normalize(x).astype(dtype)

    def _given_qk(self, x, scale, offset, dtype):
        x = x.astype(jnp.float32) * self._heads(scale[...]) + self._heads(offset[...])
        return l2_normalize(x).astype(dtype)

    def _w0(self):
        return (self.w0_0[...], self.w0_1[...], self.w0_2[...])

    def write_gates(self, u_written):
        """u_written [B, n, D] -> {"lr": [B, n, H, 3], "momentum": [B, n, H]} float32 (+ for qkv_source "own":
        "k" L2-normalised [B, n, H, dk] and "v" [B, n, H, dk] in the compute dtype)."""
        if u_written.ndim != 3 or u_written.shape[-1] != self.hidden_size:
            raise ValueError(f"TTTMLPMemory.write_gates: u_written must be [B, n, {self.hidden_size}]; "
                             f"got {u_written.shape}")
        dtype = compute_dtype(self.dtype, u_written)
        lr = jax.nn.softplus(project(u_written, self.lr_proj[...], self.lr_bias[...], dtype=dtype))
        gates = {"lr": lr.reshape(*lr.shape[:-1], self.num_heads, 3),
                 "momentum": jax.nn.sigmoid(project(u_written, self.mom_proj[...], self.mom_bias[...], dtype=dtype))}
        if self.qkv_source == "own":
            gates["k"] = self._own_qk(u_written, self.k_proj, self.k_norm, dtype)
            gates["v"] = self._heads(project(u_written, self.v_proj[...], dtype=dtype)).astype(dtype)
        return gates

    def _memory_inputs(self, q, k, v, gates, u_read, dtype):
        if self.qkv_source == "own":
            return self._own_qk(u_read, self.q_proj, self.q_norm, dtype), gates["k"], gates["v"]
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t is None or t.shape[-2:] != (self.num_heads, self.head_dim):
                raise ValueError(f"TTTMLPMemory (attn_pre_rope): {name} must end in [{self.num_heads}, "
                                 f"{self.head_dim}]; got {None if t is None else t.shape}")
        return (self._given_qk(q, self.q_scale, self.q_offset, dtype),
                self._given_qk(k, self.k_scale, self.k_offset, dtype), v.astype(dtype))

    def _output(self, o, dtype):
        flat = o.reshape(*o.shape[:-2], self.num_heads * self.head_dim)
        return (project(flat, self.o_proj[...], dtype=dtype) * self.alpha[...]).astype(dtype)

    # --- the contract ----------------------------------------------------------------------------------------------
    def __call__(self, q, k, v, gates, u_read, *, initial_state=None, output_final_state=False):
        """Parallel form over n steps (step i written with gates[:, i], read with u_read[:, i] / q[:, i]).
        q, k, v [B, n, H, dk] (used only for qkv_source "attn_pre_rope"; may be None for "own"); u_read [B, n, D].
        initial_state must sit on a chunk boundary (empty pending buffer). -> (y [B, n, D], state or None)."""
        dtype = compute_dtype(self.dtype, u_read)
        check_hidden("TTTMLPMemory", "u_read", u_read, self.hidden_size, gates["lr"].shape[:2])
        q_hat, k_hat, v_in = self._memory_inputs(q, k, v, gates, u_read, dtype)
        ops = _ttt_ops()
        kw = dict(chunk_size=self.chunk_size, inner_loss=self.inner_loss, renorm=self.renorm, impl=self.impl)
        fast0 = None if initial_state is None else initial_state["fast"]
        if not output_final_state:
            o, _ = ops.ttt_mlp(q_hat, k_hat, v_in, gates["lr"], gates["momentum"], self._w0(),
                               initial_state=fast0, **kw)
            return self._output(o, dtype), None
        o, fast, pending = ops.ttt_mlp_prefill(q_hat, k_hat, v_in, gates["lr"], gates["momentum"], self._w0(),
                                               initial_state=fast0, pending_dtype=jnp.float32, **kw)
        pos0 = jnp.zeros((), jnp.int32) if initial_state is None else initial_state["pos"]
        state = {"fast": fast, "pending": pending, "pos": pos0 + q_hat.shape[1]}
        return self._output(o, dtype), state

    def parallel_all(self, q, k, v, u):
        """feed "all": every token written and read in place. u [B, T, D] -> y [B, T, D]."""
        return self(q, k, v, self.write_gates(u), u)[0]

    def step(self, q_t, k_t, v_t, gates_t, u_read_t, state):
        """One decode step: gates_t leaves [B, ...] (one token), u_read_t [B, D] -> (y_t [B, D], state)."""
        dtype = compute_dtype(self.dtype, u_read_t)
        check_hidden("TTTMLPMemory", "u_read_t", u_read_t, self.hidden_size, gates_t["lr"].shape[:1])
        q_hat, k_hat, v_in = self._memory_inputs(q_t, k_t, v_t, gates_t, u_read_t, dtype)
        o_t, fast, pending = _ttt_ops().ttt_mlp_step(
            q_hat, k_hat, v_in, gates_t["lr"], gates_t["momentum"], state["fast"], state["pending"], state["pos"],
            self._w0(), chunk_size=self.chunk_size, inner_loss=self.inner_loss, renorm=self.renorm)
        return self._output(o_t, dtype), {"fast": fast, "pending": pending, "pos": state["pos"] + 1}

    def init_state(self, batch: int):
        """The state before any token: W~ = W_0, zero momentum, an empty pending chunk, pos 0."""
        ops = _ttt_ops()
        return {"fast": ops.ttt_mlp_init_state(self._w0(), batch),
                "pending": ops.ttt_mlp_init_pending(self._w0(), batch, self.chunk_size, jnp.float32),
                "pos": jnp.zeros((), jnp.int32)}
