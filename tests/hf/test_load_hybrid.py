"""load_pretrained(ahn=..., ahn_weights=...): the hybrid student from an HF directory plus an AHN-only file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import random_ids

import ahn_jax
from ahn_jax.hf.ahn_names import export_ahn_weights
from ahn_jax.models.memory.base import MemoryParam


@pytest.mark.parametrize("memory", ["gated_deltanet"])
def test_hybrid_loads_with_exported_memory_weights(hf_checkpoint, tmp_path, memory):
    path, _ = hf_checkpoint("qwen2_tied_g2")
    cfg = ahn_jax.AHNConfig(memory=memory, window=16, sinks=2)
    model = ahn_jax.load_pretrained(path, dtype="float32", ahn=cfg)
    # give the memory non-trivial weights, export them, load them into a fresh hybrid
    state = nnx.state(model, MemoryParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in
                                                   zip(leaves, keys)]))
    weights = tmp_path / "ahn.safetensors"
    export_ahn_weights(weights, model.memories_by_layer())
    loaded = ahn_jax.load_pretrained(path, dtype="float32", ahn=cfg, ahn_weights=str(weights))
    ids = jnp.asarray(random_ids(1, 64))
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    fresh = ahn_jax.load_pretrained(path, dtype="float32", ahn=cfg)
    assert float(jnp.abs(fresh(ids) - model(ids)).max()) > 1e-5  # the weights mattered
    np.testing.assert_array_equal(np.asarray(loaded(ids, teacher=True)),
                                  np.asarray(ahn_jax.load_pretrained(path, dtype="float32")(ids)))


def test_ahn_weights_without_config_is_a_clear_error(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2_tied_g2")
    with pytest.raises(ValueError, match="ahn_weights needs ahn=AHNConfig"):
        ahn_jax.load_pretrained(path, ahn_weights=str(tmp_path / "x.safetensors"))
