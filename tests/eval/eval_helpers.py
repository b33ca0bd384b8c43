"""Shared pieces of the eval tests: fixture paths and a tiny random Qwen model over the shipped tiny tokenizer."""

import pathlib

import jax
import numpy as np
from flax import nnx

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def tiny_hf_config(vocab_size: int, model_type: str = "qwen2") -> dict:
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def tiny_model(vocab_size: int, seed: int = 0, model_type: str = "qwen2"):
    """(model, jitted logits_fn(ids [1, T]) -> [1, T, V]) of a random float32 tiny Qwen."""
    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.qwen import QwenForCausalLM, jit_forward

    config = QwenConfig.from_hf(tiny_hf_config(vocab_size, model_type))
    model = QwenForCausalLM(config, dtype="float32", rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return model, lambda ids: jit_forward(graphdef, state, jax.numpy.asarray(ids, np.int32))
