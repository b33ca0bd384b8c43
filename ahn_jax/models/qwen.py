"""Qwen2 / Qwen2.5 / Qwen3 decoder-only language model in Flax NNX.

Module tree (param paths mirror HF names, see hf/qwen_names.py):
  QwenForCausalLM
    model: QwenModel
      embed_tokens: Embed (embedding [V, hidden])
      layers: nnx.List[QwenDecoderLayer]   (input_layernorm, self_attn, post_attention_layernorm, mlp)
      norm: RMSNorm
    lm_head: Linear [hidden, V] or None when tied (then the head reads embed_tokens.embedding; no shared Variable)

Hot path: `forward(graphdef, state, input_ids)` is a pure function (nnx.merge inside) suitable for jax.jit;
`jit_forward` is that function already jitted with graphdef static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ahn_jax.models.attention import QwenAttention, default_positions
from ahn_jax.models.config import QwenConfig
from ahn_jax.models.layers import Linear, RMSNorm, SwiGLU, _normal

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype):
    """'bfloat16' / 'float32' / 'float16' / a jnp dtype -> jnp dtype; anything else is an error naming it."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    d = jnp.dtype(dtype)
    if d.name not in DTYPES:
        raise ValueError(f"dtype={d.name!r} is not supported; expected one of {sorted(DTYPES)}")
    return d.type


class Embed(nnx.Module):
    def __init__(self, vocab: int, hidden: int, *, dtype, rngs: nnx.Rngs | None):
        self.embedding = nnx.Param(_normal(rngs, (vocab, hidden), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] int -> [B, T, hidden] in the table dtype."""
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied LM head: h [B, T, hidden] -> logits [B, T, V] float32 (float32 accumulation)."""
        table = self.embedding[...]
        return jnp.einsum("btd,vd->btv", h.astype(table.dtype), table, preferred_element_type=jnp.float32)


class QwenDecoderLayer(nnx.Module):
    def __init__(self, config: QwenConfig, *, dtype, rngs: nnx.Rngs | None):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, abstract=rngs is None)
        self.self_attn = QwenAttention(c, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, abstract=rngs is None)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, hidden], positions [B, T] -> [B, T, hidden] (pre-norm residual blocks)."""
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenModel(nnx.Module):
    def __init__(self, config: QwenConfig, *, dtype, rngs: nnx.Rngs | None):
        c = config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([QwenDecoderLayer(c, dtype=dtype, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, abstract=rngs is None)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int32 -> final normed hidden states [B, T, hidden]."""
        if positions is None:
            positions = default_positions(*input_ids.shape)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions)
        return self.norm(x)


class QwenForCausalLM(nnx.Module):
    """Qwen causal LM. `model(input_ids)` -> logits [B, T, V] float32."""

    def __init__(self, config: QwenConfig, *, dtype="float32", rngs: nnx.Rngs | None = None, abstract: bool = False):
        """abstract=True: parameters are ShapeDtypeStructs (nothing allocated); fill them with a loader."""
        dtype = resolve_dtype(dtype)
        if abstract:
            rngs = None
        elif rngs is None:
            rngs = nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype).name
        self.model = QwenModel(config, dtype=dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] -> final normed hidden states [B, T, hidden] (param dtype)."""
        return self.model(input_ids, positions)

    def logits(self, h: jax.Array) -> jax.Array:
        """h [B, T, hidden] -> logits [B, T, V] float32."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        kernel = self.lm_head.kernel[...]
        return jnp.einsum("btd,dv->btv", h.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int32, positions [B, T] (default 0..T-1) -> logits [B, T, V] float32."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        return self.logits(self.hidden_states(input_ids, positions))


def forward(graphdef, state, input_ids, positions=None):
    """Pure function: (graphdef, state) from nnx.split(model), input_ids [B, T] -> logits [B, T, V] float32."""
    return nnx.merge(graphdef, state)(input_ids, positions)


jit_forward = jax.jit(forward, static_argnums=0)


def abstract_model(config: QwenConfig, dtype: str = "bfloat16") -> QwenForCausalLM:
    """The model with ShapeDtypeStruct parameters (nothing allocated), for loading and parameter counting."""
    return QwenForCausalLM(config, dtype=dtype, abstract=True)


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (works on abstract models)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
