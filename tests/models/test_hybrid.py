"""The hybrid student (AHN.md §1, §3.2; issue 4's "Done when"): identity at init, equality with the teacher on short
sequences, the exact eviction alignment, causality, and traced == static windows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ahn_jax.models.config import QwenConfig
from ahn_jax.models.hybrid import HybridQwenForCausalLM, repeat_kv
from ahn_jax.models.hybrid_config import AHNConfig
from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.models.qwen import QwenForCausalLM
from ahn_jax.ops.window import memory_holds

TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}
AHN_MEMORIES = ("gated_deltanet", "deltanet", "mamba2")


def make(memory, window, sinks, seed=0, randomize_output=False):
    base = QwenForCausalLM(QwenConfig.from_hf(TINY), dtype="float32", rngs=nnx.Rngs(seed))
    model = HybridQwenForCausalLM(base, AHNConfig(memory=memory, window=window, sinks=sinks, chunk_size=8),
                                  rngs=nnx.Rngs(seed + 1))
    if randomize_output:
        # The zero-initialised output projection hides the memory entirely; give it weight so tests can fail.
        state = nnx.state(model, MemoryParam)
        key = jax.random.key(seed + 2)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(key, len(leaves))
        leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def ids_for(T, B=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=(B, T)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _memory_read(graphdef, state, q, k, v, u_written, u_read):
    """The memory's parallel form over k, v (gates from u_written), read by q, u_read: the last step's output.
    Jitted because op by op each call took ~0.4 s (~80 s per test run); graphdef is static, so the compiled
    function for each length is shared by every window/sinks case of a memory kind."""
    mem = nnx.merge(graphdef, state)
    y, _ = mem(q, k, v, mem.write_gates(u_written), u_read)
    return y[:, -1]


@pytest.mark.parametrize("memory", AHN_MEMORIES)
@pytest.mark.parametrize("window,sinks", [(5, 0), (4, 3)])
def test_zero_output_projection_gives_the_window_model_exactly(memory, window, sinks):
    model = make(memory, window, sinks)
    ids = ids_for(23)
    student = model(ids)
    window_only = model(ids, use_memory=False)
    np.testing.assert_array_equal(np.asarray(student), np.asarray(window_only))
    assert float(jnp.abs(student - model(ids, teacher=True)).max()) > 1e-4  # the window really cuts


@pytest.mark.parametrize("memory", AHN_MEMORIES)
def test_short_sequences_equal_the_teacher(memory):
    model = make(memory, 6, 2, randomize_output=True)
    ids = ids_for(8)  # T <= sinks + window: nothing is evicted
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(model(ids, teacher=True)), atol=1e-5)


@pytest.mark.parametrize("memory", AHN_MEMORIES)
@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 0), (4, 2), (6, 5)])
def test_each_token_reaches_the_memory_once_when_it_leaves_the_window(memory, window, sinks):
    """y at query t must be the memory run over exactly {j : memory_holds(t, j)} in order, read by q_t."""
    model = make(memory, window, sinks, randomize_output=True)
    mem = model.memory_for(0)
    rng = np.random.default_rng(1)
    B, T, H, D = 1, 17, 4, 8
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, 2, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, 2, D)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(B, T, TINY["hidden_size"])), jnp.float32)
    y = np.asarray(model._evicted_memory(mem, q, k, v, u, window, sinks))
    kr, vr = repeat_kv(k, H), repeat_kv(v, H)
    graphdef, state = nnx.split(mem)
    for t in range(T):
        held = [j for j in range(T) if bool(memory_holds(t, j, window, sinks))]
        if not held:
            np.testing.assert_array_equal(y[:, t], 0.0)
            continue
        js = np.asarray(held)
        n = len(js)
        qt = jnp.broadcast_to(q[:, t:t + 1], (B, n, H, D))
        ut = jnp.broadcast_to(u[:, t:t + 1], (B, n, u.shape[-1]))
        ref = _memory_read(graphdef, state, qt, kr[:, js], vr[:, js], u[:, js], ut)
        np.testing.assert_allclose(y[:, t], np.asarray(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory", AHN_MEMORIES)
def test_traced_window_equals_static_window(memory):
    model = make(memory, 5, 3, randomize_output=True)
    ids = ids_for(21)
    static = model(ids)
    graphdef, state = nnx.split(model)
    traced = jax.jit(lambda s, i, w, k: nnx.merge(graphdef, s)(i, window=w, sinks=k))(
        state, ids, jnp.int32(5), jnp.int32(3))
    np.testing.assert_allclose(np.asarray(traced), np.asarray(static), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", AHN_MEMORIES)
def test_student_is_causal(memory):
    model = make(memory, 3, 1, randomize_output=True)
    ids = ids_for(16, B=1)
    j = 9
    changed = ids.at[0, j].set((ids[0, j] + 1) % TINY["vocab_size"])
    a, b = np.asarray(model(ids)), np.asarray(model(changed))
    np.testing.assert_array_equal(a[:, :j], b[:, :j])
    assert np.abs(a[:, j:] - b[:, j:]).max() > 0


def test_gradients_reach_only_memory_parameters():
    model = make("gated_deltanet", 4, 1)
    ids = ids_for(20)
    graphdef, mem_params, rest = nnx.split(model, MemoryParam, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.mean(m(ids) ** 2)

    g = jax.jit(jax.grad(loss))(mem_params)  # jitted: op by op the backward took ~3x as long
    norms = {"/".join(map(str, path)): float(jnp.abs(x).max()) for path, x in jax.tree_util.tree_leaves_with_path(g)}
    # At init only o_proj receives gradient (its input is non-zero, its output is zero, AHN.md §1.5).
    assert any(v > 0 for k, v in norms.items() if "o_proj" in k)
