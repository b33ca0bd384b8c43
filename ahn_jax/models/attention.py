"""QwenAttention: GQA self-attention with q/k/v bias (Qwen2) or per-head q/k RMSNorm before RoPE (Qwen3).

The work is split into seams the hybrid (window + memory) model reuses:
  project(u, positions) -> q, k, v      (normed, rotated, KV heads not repeated)
  attend(q, k, v)       -> o            (the only place the attention kernel is called)
  output(o)             -> hidden       (o_proj)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ahn_jax.models.config import QwenConfig
from ahn_jax.models.layers import Linear, RMSNorm, RotaryEmbedding


class QwenAttention(nnx.Module):
    def __init__(self, config: QwenConfig, *, dtype, rngs: nnx.Rngs | None):
        # rngs=None: abstract parameters (ShapeDtypeStruct), used for loading
        c = config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.scale = c.head_dim ** -0.5
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias, dtype=dtype,
                             rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias, dtype=dtype,
                             rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias, dtype=dtype,
                             rngs=rngs)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias, dtype=dtype,
                             rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, abstract=rngs is None)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, abstract=rngs is None)
        else:
            self.q_norm = None
            self.k_norm = None
        self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)

    def project(self, u: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """u [B, T, hidden], positions [B, T] -> q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D].

        q and k are post q_norm/k_norm (Qwen3) and post-RoPE; KV heads are not repeated for GQA.
        """
        b, t, _ = u.shape
        q = self.q_proj(u).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(u).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(u).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return self.rope(q, positions), self.rope(k, positions), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Full causal attention. q [B, T, Hq, D], k/v [B, T, Hkv, D] -> o [B, T, Hq, D] (dtype of q).

        jax repeats the KV heads for GQA and runs the softmax in float32. The hybrid model swaps this method for
        ahn_jax.ops.attention (window + sinks).
        """
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=self.scale, implementation=None)

    def output(self, o: jax.Array) -> jax.Array:
        """o [B, T, Hq, D] -> [B, T, hidden] (o_proj)."""
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))

    def __call__(self, u: jax.Array, positions: jax.Array) -> jax.Array:
        """u [B, T, hidden], positions [B, T] -> [B, T, hidden]."""
        q, k, v = self.project(u, positions)
        return self.output(self.attend(q, k, v))


def default_positions(batch: int, seq_len: int) -> jax.Array:
    """[B, T] int32 positions 0..T-1."""
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
