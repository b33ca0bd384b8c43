"""AHN-DN: the DeltaNet memory cell (spec/AHN.md §2.2, §1.5), and the AHN head shared with AHN-GDN.

Per head h, for the written token j (prenormed hidden u_j, post-RoPE key k_j, value v_j):
    beta_j = sigmoid(u_j . w_beta,h)                               b_proj [D, Hq]
    M_j    = (I - beta_j k^_j k^_j^T) M_{j-1} + beta_j k^_j v_j^T   k^ = k/||k|| (inside the op), M [Dh, Dh] float32
    o_t    = M_j^T q^_t / sqrt(Dh)
AHN head (§1.5), from the reading token's prenormed hidden u_t:
    gamma_t = u_t . w_gamma,h                                       g_proj [D, Hq], one scalar per head
    o~_t    = RMSNorm_Dh(o_t) * o_norm * swish(gamma_t)              eps 1e-5, float32, o_norm [Dh] shared by heads
    y_t,h   = o~_t,h @ o_proj[h]                                    o_proj [Hq, Dh, Dh] ([in, out]), zero at init
The recurrence itself lives in ahn_jax/ops/delta_rule.py (never re-implemented here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ahn_jax.models.memory.base import (
    Memory, MemoryParam, check_hidden, check_qkv, compute_dtype, first_step, group_linear, normal_param,
    project, rms_normalize)


def _delta_ops():
    # Imported when used so the model package imports even where the op module is being rebuilt.
    from ahn_jax.ops import gated_delta as delta_rule

    return delta_rule


class DeltaNetMemory(Memory):
    """AHN-DN. Parameters (MemoryParam, float32): b_proj [D, Hq], g_proj [D, Hq], o_norm [Dh], o_proj [Hq, Dh, Dh].
    Gates: {"beta": [B, n, Hq]}. State: [B, Hq, Dh(K), Dh(V)] float32."""

    kind = "deltanet"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 128, *, chunk_size: int = 64,
                 impl: str = "auto", dtype=None, norm_eps: float = 1e-5, rngs: nnx.Rngs):
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.chunk_size, self.impl, self.dtype, self.norm_eps = chunk_size, impl, dtype, norm_eps
        self.b_proj = normal_param(rngs, (hidden_size, num_heads))
        self._init_decay(rngs)
        self.g_proj = normal_param(rngs, (hidden_size, num_heads))
        self.o_norm = MemoryParam(jnp.ones((head_dim,), jnp.float32))
        # Zero output projection: at step 0 the student is exactly the sink + window model (spec/AHN.md §1.5).
        self.o_proj = MemoryParam(jnp.zeros((num_heads, head_dim, head_dim), jnp.float32))

    # --- hooks the gated variant overrides -------------------------------------------------------------------------
    def _init_decay(self, rngs):
        """DeltaNet has no decay parameters."""

    def _decay_gates(self, u, dtype):
        return {}

    def _run(self, q, k, v, gates, initial_state, output_final_state):
        return _delta_ops().delta_rule(
            q, k, v, gates["beta"], scale=self.head_dim ** -0.5, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm=True, chunk_size=self.chunk_size, impl=self.impl)

    def _run_step(self, q_t, k_t, v_t, gates_t, state):
        return _delta_ops().delta_rule_step(q_t, k_t, v_t, gates_t["beta"], state, scale=self.head_dim ** -0.5,
                                            use_qk_l2norm=True)

    # --- the contract ----------------------------------------------------------------------------------------------
    def write_gates(self, u_written):
        """u_written [B, n, D] -> {"beta": [B, n, Hq] (, "g": [B, n, Hq] for GDN)}, float32."""
        if u_written.ndim != 3 or u_written.shape[-1] != self.hidden_size:
            raise ValueError(f"{type(self).__name__}.write_gates: u_written must be [B, n, {self.hidden_size}]; "
                             f"got {u_written.shape}")
        dtype = compute_dtype(self.dtype, u_written)
        gates = {"beta": jax.nn.sigmoid(project(u_written, self.b_proj[...], dtype=dtype))}
        gates.update(self._decay_gates(u_written, dtype))
        return gates

    def read_out(self, o, u_read, dtype):
        """The AHN head: o [B, n, Hq, Dh] readout, u_read [B, n, D] -> y [B, n, Hq*Dh] in `dtype`."""
        gamma = project(u_read, self.g_proj[...], dtype=dtype)  # [B, n, Hq] float32
        normed = rms_normalize(o, self.norm_eps) * self.o_norm[...] * jax.nn.silu(gamma)[..., None]
        y = group_linear(normed, self.o_proj[...], dtype=dtype)
        return y.reshape(*y.shape[:-2], self.num_heads * self.head_dim)

    def __call__(self, q, k, v, gates, u_read, *, initial_state=None, output_final_state=False):
        """Parallel form. q, k, v [B, n, Hq, Dh]; gates from write_gates of the written tokens; u_read [B, n, D]
        -> (y [B, n, Hq*Dh], state [B, Hq, Dh, Dh] float32 or None)."""
        name = type(self).__name__
        check_qkv(name, q, k, v, self.num_heads, self.head_dim, step=False)
        check_hidden(name, "u_read", u_read, self.hidden_size, q.shape[:2])
        dtype = compute_dtype(self.dtype, q)
        o, state = self._run(q.astype(dtype), k.astype(dtype), v.astype(dtype), gates, initial_state,
                             output_final_state)
        return self.read_out(o, u_read, dtype), (state if output_final_state else None)

    def step(self, q_t, k_t, v_t, gates_t, u_read_t, state):
        """One decode step. q_t, k_t, v_t [B, Hq, Dh]; gates_t leaves [B, Hq]; u_read_t [B, D]; state from
        init_state or a previous call -> (y_t [B, Hq*Dh], state)."""
        name = type(self).__name__
        check_qkv(name, q_t, k_t, v_t, self.num_heads, self.head_dim, step=True)
        check_hidden(name, "u_read_t", u_read_t, self.hidden_size, q_t.shape[:1])
        dtype = compute_dtype(self.dtype, q_t)
        o_t, state = self._run_step(q_t.astype(dtype), k_t.astype(dtype), v_t.astype(dtype), gates_t, state)
        y = self.read_out(first_step(o_t), first_step(u_read_t), dtype)
        return y[:, 0], state

    def init_state(self, batch: int):
        """Zero recurrent state [batch, Hq, Dh(K), Dh(V)] float32."""
        return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
