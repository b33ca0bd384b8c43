"""The hybrid student: the frozen Qwen model with sliding-window + sinks attention and a memory per layer
(spec/AHN.md §1, spec/ALLMEM.md §3), and the same weights as the full-attention teacher.

One decoder layer, student path (AHN, memory output site "pre_o_proj"):
    u = input_layernorm(x);  q, k, v = self_attn.project(u)              (post-RoPE, frozen)
    o = attention(q, k, v, window=W, sinks=S)                              (ahn_jax.ops.attention)
    y = memory over the evicted tokens, aligned by ops/window.py:           step i absorbs token S+i (k, v, gates from
        u[S+i]) and is read by the query at S+W+i (q, and u for the output gate); queries before S+W read nothing
    x = x + o_proj(o + y);  x = x + mlp(post_attention_layernorm(x))
AllMem (output site "residual"): x = x + o_proj(o) + y, the memory reading every token in place.
Teacher path: the same layer with full causal attention and no memory.

`window` and `sinks` may be Python ints (exact slices; what prefill uses) or traced int32 scalars (the trainer samples
them per step): then the memory runs over a static length T with the inputs shifted by dynamic slices; the extra steps
past the last evicted token come after every real one and feed no real query, so outputs are identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ahn_jax.models.attention import default_positions
from ahn_jax.models.hybrid_config import AHNConfig, build_memory
from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.models.qwen import QwenForCausalLM
from ahn_jax.ops.attention import attention
from ahn_jax.ops.window import first_memory_query


def _is_static(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shift_left(x, start, length):
    """x [B, T, ...] -> x'[:, i] = x[:, start + i], zeros past the end; `start` may be traced; result length `length`."""
    padded = jnp.concatenate([x, jnp.zeros((x.shape[0], length) + x.shape[2:], x.dtype)], axis=1)
    return jax.lax.dynamic_slice_in_dim(padded, start, length, axis=1)


def _shift_right(y, offset, length):
    """y [B, n, ...] -> y'[:, t] = y[:, t - offset] for t >= offset, else 0; result length `length`."""
    padded = jnp.concatenate([jnp.zeros((y.shape[0], length) + y.shape[2:], y.dtype), y], axis=1)
    return jax.lax.dynamic_slice_in_dim(padded, length - offset, length, axis=1)


def repeat_kv(x, num_heads):
    """[B, T, Hkv, D] -> [B, T, Hq, D]: query head h uses KV head h // (Hq / Hkv) (AHN.md §1.1 step 4)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def finish_layer(layer, mem, x, o, y):
    """The rest of a hybrid decoder layer once attention (o [B, T, Hq, D]) and the memory (y, or None) ran: AHN adds y
    to o before the frozen o_proj, AllMem adds it to the residual stream; then the MLP block. The one definition the
    parallel forward and the cached prefill/decode share."""
    residual_y = None
    if y is not None:
        if mem.output_site == "pre_o_proj":
            o = o + y.reshape(o.shape).astype(o.dtype)
        else:
            residual_y = y
    x = x + layer.self_attn.output(o)
    if residual_y is not None:
        x = x + residual_y.astype(x.dtype)
    return x + layer.mlp(layer.post_attention_layernorm(x))


class HybridQwenForCausalLM(nnx.Module):
    """`model(ids)` -> student logits [B, T, V] float32; `model(ids, teacher=True)` -> teacher logits.

    The base model's parameters are plain nnx.Param (frozen); every memory parameter is a MemoryParam, so
    `nnx.state(model, MemoryParam)` is exactly what trains and what an AHN-only checkpoint holds.
    """

    def __init__(self, base: QwenForCausalLM, ahn: AHNConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = base.config
        self.base = base
        self.config = c
        self.ahn = ahn
        self.memory_layers = tuple(ahn.resolve_layers(c.num_hidden_layers))
        self.memories = nnx.List([build_memory(ahn, c, layer, rngs=rngs) for layer in self.memory_layers])
        for layer, mem in zip(self.memory_layers, self.memories):
            if getattr(mem, "qkv_source", None) == "own":
                # AllMem Option A: the memory's own projections start from the frozen attention (ALLMEM.md §3.2).
                attn = base.model.layers[layer].self_attn
                mem.init_from_attention(attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.v_proj.kernel[...],
                                        attn.o_proj.kernel[...],
                                        None if attn.q_norm is None else attn.q_norm.weight[...],
                                        None if attn.k_norm is None else attn.k_norm.weight[...])
            elif getattr(mem, "qkv_source", None) == "attn_pre_rope":
                raise NotImplementedError("ttt_qkv_source='attn_pre_rope' is not wired into the hybrid layer yet "
                                          "(it needs the attention's pre-RoPE q/k); use 'own'")

    # --- building blocks --------------------------------------------------------------------------------------------
    def memory_for(self, layer_idx: int):
        """The memory of decoder layer `layer_idx`, or None where that layer keeps plain window attention."""
        if layer_idx in self.memory_layers:
            return self.memories[self.memory_layers.index(layer_idx)]
        return None

    def memories_by_layer(self) -> dict:
        """{decoder layer id: memory module}, the mapping hf.ahn_names imports and exports."""
        return dict(zip(self.memory_layers, self.memories))

    def _attend(self, q, k, v, window, sinks):
        return attention(q, k, v, window=window, sinks=sinks, impl=self.ahn.attention_impl,
                         max_window=None if _is_static(window) else self.ahn.max_window,
                         max_sinks=None if _is_static(sinks) else self.ahn.max_sinks)

    def _evicted_memory(self, mem, q, k, v, u, window, sinks):
        """AHN alignment over the whole sequence (static length T). Returns y [B, T, Hq*Dh], zero before S+W."""
        B, T, Hq, _ = q.shape
        k, v = repeat_kv(k, Hq), repeat_kv(v, Hq)
        first = first_memory_query(window, sinks)
        if _is_static(window) and _is_static(sinks):
            n = T - first
            if n <= 0:
                return jnp.zeros((B, T, mem.out_features), q.dtype)
            gates = mem.write_gates(u[:, sinks:sinks + n])
            y, _ = mem(q[:, first:], k[:, sinks:sinks + n], v[:, sinks:sinks + n], gates, u[:, first:])
            return jnp.concatenate([jnp.zeros((B, first, y.shape[-1]), y.dtype), y], axis=1)
        gates = mem.write_gates(_shift_left(u, sinks, T))
        y, _ = mem(_shift_left(q, first, T), _shift_left(k, sinks, T), _shift_left(v, sinks, T), gates,
                   _shift_left(u, first, T))
        return _shift_right(y, jnp.minimum(first, T), T)

    def _memory_output(self, mem, q, k, v, u, window, sinks):
        if getattr(mem, "feed", "evicted") == "all":
            return mem.parallel_all(q, k, v, u)
        return self._evicted_memory(mem, q, k, v, u, window, sinks)

    def layer_forward(self, layer_idx, x, positions, *, teacher, window, sinks, use_memory=True):
        """One decoder layer. x [B, T, hidden] -> [B, T, hidden]. use_memory=False gives the window + sinks model."""
        layer = self.base.model.layers[layer_idx]
        attn = layer.self_attn
        u = layer.input_layernorm(x)
        q, k, v = attn.project(u, positions)
        mem = None if (teacher or not use_memory) else self.memory_for(layer_idx)
        if teacher:
            o = self._attend(q, k, v, None, 0)
        else:
            o = self._attend(q, k, v, window, sinks)
        y = None if mem is None else self._memory_output(mem, q, k, v, u, window, sinks)
        return finish_layer(layer, mem, x, o, y)

    # --- whole model ------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids, positions=None, *, teacher=False, window=None, sinks=None, remat=False,
                      use_memory=True):
        """input_ids [B, T] -> final normed hidden states [B, T, hidden]. window/sinks default to the AHNConfig's and
        may be traced scalars; use_memory=False runs the window + sinks model without its memory."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        window = self.ahn.window if window is None else window
        sinks = self.ahn.sinks if sinks is None else sinks
        if positions is None:
            positions = default_positions(*input_ids.shape)
        x = self.base.model.embed_tokens(input_ids)
        for i in range(self.config.num_hidden_layers):
            if remat:
                x = self._remat_layer(i, x, positions, teacher, window, sinks, use_memory)
            else:
                x = self.layer_forward(i, x, positions, teacher=teacher, window=window, sinks=sinks,
                                       use_memory=use_memory)
        return self.base.model.norm(x)

    def _remat_layer(self, i, x, positions, teacher, window, sinks, use_memory):
        """layer_forward under nnx.remat: the backward pass recomputes the layer instead of storing its activations.
        The layer index, flags and static window/sinks are closed over so they stay Python values."""
        # jax.checkpoint over an explicit split/merge: a pure function of the arrays (nnx.remat would try to write
        # the variables back into a module that may belong to an outer jit trace).
        graphdef, state = nnx.split(self)

        def fn(state, x, positions):
            return nnx.merge(graphdef, state).layer_forward(i, x, positions, teacher=teacher, window=window,
                                                            sinks=sinks, use_memory=use_memory)

        return jax.checkpoint(fn)(state, x, positions)

    def lm_head_matrix(self):
        """The LM head as [hidden, V] (the transposed embedding table when tied)."""
        if self.base.lm_head is None:
            return self.base.model.embed_tokens.embedding[...].T
        return self.base.lm_head.kernel[...]

    def logits(self, h):
        return self.base.logits(h)

    def __call__(self, input_ids, positions=None, *, teacher=False, window=None, sinks=None, use_memory=True):
        """input_ids [B, T] int32 -> logits [B, T, V] float32 (student unless teacher=True)."""
        return self.logits(self.hidden_states(input_ids, positions, teacher=teacher, window=window, sinks=sinks,
                                              use_memory=use_memory))

    # --- constant-memory inference (thin: the work lives in ahn_jax.inference, imported here so models/ never
    # imports it at module level) ------------------------------------------------------------------------------------
    def prefill(self, input_ids, lengths=None, *, chunk=None, teacher=False, max_length=None,
                return_all_logits=False):
        """input_ids [B, T] -> (last logits [B, V], cache); see ahn_jax.inference.decode.prefill.
        teacher=True: full attention with a growing KV cache of max_length tokens."""
        from ahn_jax.inference.decode import prefill

        return prefill(self, input_ids, lengths, chunk=chunk, teacher=teacher, max_length=max_length,
                       return_all_logits=return_all_logits)

    def decode(self, token_ids, cache):
        """token_ids [B] or [B, 1] -> (logits [B, V], cache); see ahn_jax.inference.decode.decode."""
        from ahn_jax.inference.decode import decode

        return decode(self, token_ids, cache)


def memory_state(model: nnx.Module):
    """The trainable memory parameters of a model (what the optimizer and AHN-only checkpoints hold)."""
    return nnx.state(model, MemoryParam)
