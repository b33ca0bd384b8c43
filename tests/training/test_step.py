"""The jitted distillation step: remat changes nothing numerically, the loss mask drops positions before the window,
and only the memory parameters move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ahn_jax.models.config import QwenConfig
from ahn_jax.models.hybrid import HybridQwenForCausalLM
from ahn_jax.models.hybrid_config import AHNConfig
from ahn_jax.models.qwen import QwenForCausalLM
from ahn_jax.training.optim import make_optimizer
from ahn_jax.training.step import StepOptions, loss_mask, make_train_step, split_model

TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def setup():
    base = QwenForCausalLM(QwenConfig.from_hf(TINY), dtype="float32", rngs=nnx.Rngs(0))
    model = HybridQwenForCausalLM(base, AHNConfig(memory="gated_deltanet", window=6, sinks=2, chunk_size=8,
                                                  max_window=8, max_sinks=4), rngs=nnx.Rngs(1))
    graphdef, mem, frozen = split_model(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(2, 40)), jnp.int32)
    return graphdef, mem, frozen, {"input_ids": ids, "loss_mask": jnp.ones((2, 40))}


def _run(step, tx, mem, frozen, batch, n=3):
    """n steps from a copy of mem at window 6, sinks 2 -> (losses, final memory parameters)."""
    p, o = jax.tree.map(jnp.copy, mem), tx.init(mem)
    losses = []
    for _ in range(n):
        p, o, m = step(p, o, frozen, batch, jnp.int32(6), jnp.int32(2))
        losses.append(float(m["loss"]))
    return losses, p


@pytest.fixture(scope="module")
def reference_losses(setup):
    """Three steps of the plain step (no remat, traced window, one device): the run every other variant must equal.
    Shared so its compile (the bulk of each test's time) happens once per module, not in each test."""
    graphdef, mem, frozen, batch = setup
    tx = make_optimizer(mem, lr=1e-2, steps=10, warmup_ratio=0.0)
    return _run(make_train_step(graphdef, tx, StepOptions(remat=False)), tx, mem, frozen, batch)[0]


def test_remat_matches_no_remat_and_only_memory_moves(setup, reference_losses):
    graphdef, mem, frozen, batch = setup
    tx = make_optimizer(mem, lr=1e-2, steps=10, warmup_ratio=0.0)
    losses, p = _run(make_train_step(graphdef, tx, StepOptions(remat=True)), tx, mem, frozen, batch)
    np.testing.assert_allclose(reference_losses, losses, rtol=1e-5)
    assert reference_losses[0] > 0 and reference_losses[-1] != reference_losses[0]
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p, mem)
    assert max(jax.tree.leaves(moved)) > 0


def test_loss_mask_starts_at_sinks_plus_window():
    m = loss_mask({"loss_mask": jnp.ones((1, 10))}, jnp.int32(4), jnp.int32(2), True)
    np.testing.assert_array_equal(np.asarray(m[0]), [0] * 6 + [1] * 4)
    assert float(loss_mask({"loss_mask": jnp.ones((1, 10))}, 4, 2, False).sum()) == 10


def test_static_window_step_equals_traced_window_step(setup, reference_losses):
    graphdef, mem, frozen, batch = setup
    tx = make_optimizer(mem, lr=1e-2, steps=10, warmup_ratio=0.0)
    step = make_train_step(graphdef, tx, StepOptions(remat=False), static_window=(6, 2))
    _, _, m = step(jax.tree.map(jnp.copy, mem), tx.init(mem), frozen, batch, jnp.int32(6), jnp.int32(2))
    np.testing.assert_allclose(reference_losses[0], float(m["loss"]), rtol=1e-5)


def test_fsdp_state_keeps_its_shardings_and_compiles_once(setup, reference_losses):
    """With state_shardings the updated memory/optimizer state leaves the step in the shardings it came in with (XLA
    otherwise picks its own: on GPU it returned the 3B memory fsdp-sharded where the step took it replicated, and the
    next call failed), so the donated buffers are reused and step 2 does not recompile; losses equal one device's."""
    from ahn_jax import compat, sharding

    graphdef, mem, frozen, batch = setup
    tx = make_optimizer(mem, lr=1e-2, steps=10, warmup_ratio=0.0)
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    with compat.set_mesh(mesh):
        p = jax.device_put(jax.tree.map(jnp.copy, mem), sharding.shard_params(mem, mesh))
        o = jax.device_put(tx.init(p), sharding.shard_params(tx.init(p), mesh))
        fr = jax.device_put(frozen, sharding.shard_params(frozen, mesh))
        b = jax.device_put(batch, sharding.batch_sharding(mesh))
        state_sh = (jax.tree.map(lambda x: x.sharding, p), jax.tree.map(lambda x: x.sharding, o))
        assert any(x.sharding.spec and x.sharding.spec[0] == "fsdp" for x in jax.tree.leaves(fr)), "no fsdp weight"
        step = make_train_step(graphdef, tx, StepOptions(remat=False), state_shardings=state_sh)
        got = []
        for _ in range(3):
            p, o, m = step(p, o, fr, b, jnp.int32(6), jnp.int32(2))
            got.append(float(m["loss"]))
            for x, s in zip(jax.tree.leaves((p, o)), jax.tree.leaves(state_sh)):
                assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    assert step._cache_size() == 1
    np.testing.assert_allclose(got, reference_losses, rtol=1e-4)  # sharded reductions sum in another order
