"""Tiny random hybrid models for the inference tests (float32, non-zero memory output so the memory matters)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ahn_jax.models.config import QwenConfig
from ahn_jax.models.hybrid import HybridQwenForCausalLM
from ahn_jax.models.hybrid_config import AHNConfig
from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.models.qwen import QwenForCausalLM

TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}
MEMORIES = ("gated_deltanet", "deltanet", "mamba2", "ttt_mlp")


@functools.lru_cache(maxsize=None)
def make(memory, window, sinks, chunk_size=4, seed=0):
    """A hybrid model whose memory parameters (zero-initialised o_proj / alpha included) are perturbed randomly:
    otherwise the memory adds nothing and a cache bug in it could not fail a test."""
    base = QwenForCausalLM(QwenConfig.from_hf(TINY), dtype="float32", rngs=nnx.Rngs(seed))
    model = HybridQwenForCausalLM(base, AHNConfig(memory=memory, window=window, sinks=sinks, chunk_size=chunk_size),
                                  rngs=nnx.Rngs(seed + 1))
    leaves, treedef = jax.tree.flatten(nnx.state(model, MemoryParam))
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))
    return model


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(graphdef, state, ids, teacher, use_memory):
    return nnx.merge(graphdef, state)(ids, teacher=teacher, use_memory=use_memory)


def parallel_logits(model, ids, teacher=False, use_memory=True):
    """The parallel forward model(ids) [B, T, V], jitted (eager dispatch of the tiny model is slower than a compile).
    One jitted function with the graph static: tests that run one make() model on the same shapes share its compile
    (~1.5 s each). The switches the inference tests patch (decode, cache) are not read by this forward."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, ids, teacher, use_memory)


def random_ids(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=(B, T)), jnp.int32)


def memory_effect(model, ids):
    """max |student - window-only| logits: proves the memory contributes on this input."""
    return float(jnp.abs(parallel_logits(model, ids) - parallel_logits(model, ids, use_memory=False)).max())


def greedy_with_switch_off_and_on(monkeypatch, dec, ids, chunk, switch, kernel_module, kernel_name, steps=4):
    """Decoder.greedy's tokens with the decode module's `switch` False and True, and whether `kernel_name` of
    `kernel_module` was traced (greedy compiles its own loop: a switch must reach it too)."""
    from ahn_jax.inference import decode

    calls = []
    kernel = getattr(kernel_module, kernel_name)
    monkeypatch.setattr(kernel_module, kernel_name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = {}
    for on in (False, True):
        monkeypatch.setattr(decode, switch, on)
        last, cache = dec.prefill(ids, chunk=chunk)
        first = jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None]
        out[on], _ = dec.greedy(first, cache, steps)
    return out, bool(calls)
