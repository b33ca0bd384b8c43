"""The fused Pallas decode step of the DeltaNet / Gated DeltaNet memory (pallas_kernels/memory_decode.py, interpret
mode on CPU) against the XLA path it replaces (decode._memory_decode -> mem.step -> read_out), and prefill + decode
with decode.FUSED_MEMORY_DECODE on against the parallel forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels.memory_decode as memory_decode
from ahn_jax.inference import decode
from ahn_jax.inference.decode import Decoder, _memory_decode, fuses_memory_decode
from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.models.memory.deltanet import DeltaNetMemory
from ahn_jax.models.memory.gated_deltanet import GatedDeltaNetMemory
from ahn_jax.ops.window import first_memory_query
from inference_helpers import greedy_with_switch_off_and_on, make, parallel_logits, random_ids

HIDDEN, HQ, HKV, RING, WINDOW, SINKS = 64, 4, 2, 9, 8, 2  # GQA group 2; R = W + 1 as the cache makes it


def _memory(cls, head_dim, seed, hidden=HIDDEN, hq=HQ):
    """A memory whose parameters (o_proj is zero at init) are all random, so every term of the head matters."""
    mem = cls(hidden, hq, head_dim, rngs=nnx.Rngs(seed))
    leaves, treedef = jax.tree.flatten(nnx.state(mem, MemoryParam))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(mem, jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                 for x, k in zip(leaves, keys)]))
    return mem


def _step_inputs(mem, head_dim, dtype, seed, batch=4, hidden=HIDDEN, hq=HQ, hkv=HKV):
    """Random decode-step inputs in the cache's layout. Positions straddle first_memory_query (some sequences evict,
    some do not) and land on different ring slots."""
    ks = jax.random.split(jax.random.key(seed), 8)
    d = head_dim
    first = first_memory_query(WINDOW, SINKS)
    positions = jnp.asarray([first - 1, first, first + 5, first + 13][:batch], jnp.int32)[:, None]
    ring_k = jax.random.normal(ks[0], (batch, hkv, RING, d), jnp.float32).astype(dtype)
    ring_v = jax.random.normal(ks[1], (batch, hkv, RING, d), jnp.float32).astype(dtype)
    gates = {"beta": jax.nn.sigmoid(jax.random.normal(ks[2], (batch, RING, hq)))}
    if isinstance(mem, GatedDeltaNetMemory):
        gates["g"] = -jax.nn.softplus(jax.random.normal(ks[3], (batch, RING, hq)))
    state = 0.3 * jax.random.normal(ks[4], (batch, 1, hq, d, d), jnp.float32)  # the cache's per-sequence form
    q = jax.random.normal(ks[5], (batch, 1, hq, d), jnp.float32).astype(dtype)
    u = jax.random.normal(ks[6], (batch, 1, hidden), jnp.float32).astype(dtype)
    return ring_k, ring_v, gates, state, q, u, positions


def _run(mem, inputs, fused, block_v=None, columns=None):
    ring_k, ring_v, gates, state, q, u, positions = inputs
    fused = ("fused", block_v, columns) if fused else False  # what the jitted step gets (decode._fused_memory_static)
    # k, v of the new token are not read on the evicted-token path (the ring holds them already).
    return jax.jit(lambda *a: _memory_decode(mem, *a[:5], None, None, *a[5:], WINDOW, SINKS, fused=fused))(
        ring_k, ring_v, gates, state, q, u, positions)


QWEN25_3B_DIMS = dict(hidden=2048, hq=16, hkv=2)  # what benchmarks/bench_decode.py runs (with head_dim 128)


@pytest.mark.parametrize("cls,head_dim,dtype,dims,block_v,columns", [
    (GatedDeltaNetMemory, 16, jnp.float32, {}, None, None), (DeltaNetMemory, 32, jnp.float32, {}, None, None),
    (GatedDeltaNetMemory, 32, jnp.bfloat16, {}, None, None), (DeltaNetMemory, 16, jnp.bfloat16, {}, None, None),
    (GatedDeltaNetMemory, 16, jnp.float32, {}, 8, None), (DeltaNetMemory, 32, jnp.bfloat16, {}, 16, None),
    (GatedDeltaNetMemory, 16, jnp.float32, {}, None, 4), (DeltaNetMemory, 32, jnp.bfloat16, {}, None, 8),
    (GatedDeltaNetMemory, 128, jnp.float32, QWEN25_3B_DIMS, None, None),
    (GatedDeltaNetMemory, 128, jnp.bfloat16, QWEN25_3B_DIMS, None, None),
    (GatedDeltaNetMemory, 128, jnp.float32, QWEN25_3B_DIMS, 32, None),
    (GatedDeltaNetMemory, 128, jnp.bfloat16, QWEN25_3B_DIMS, None, 16),
    (GatedDeltaNetMemory, 128, jnp.float32, QWEN25_3B_DIMS, None, 64)])  # 2 programs per head: 2 gate blocks each
def test_fused_step_equals_the_xla_path(cls, head_dim, dtype, dims, block_v, columns):
    """block_v None: the one-kernel form; an int: the split form (state kernel over value blocks + head kernel);
    columns an int: the column form (one kernel over value blocks, the head's partials finished by XLA)."""
    mem = _memory(cls, head_dim, seed=head_dim, **{k: v for k, v in dims.items() if k != "hkv"})
    inputs = _step_inputs(mem, head_dim, dtype, seed=3, **dims)
    y_ref, s_ref = _run(mem, inputs, fused=False)
    y, s = _run(mem, inputs, fused=True, block_v=block_v, columns=columns)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and s.shape == s_ref.shape and s.dtype == s_ref.dtype
    evict = np.asarray(inputs[-1][:, 0] >= first_memory_query(WINDOW, SINKS))
    assert evict.any() and not evict.all()
    y32, y_ref32 = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    assert np.abs(y_ref32[evict]).min(axis=-1).max() > 0 and np.abs(y_ref32).max() > 1e-2  # a real readout
    # bf16: both round the same values to bf16, but float32 sums in another order can flip a last bit.
    # Relative to the readout's largest magnitude (|y| reaches ~100 at D 128, hidden 2048 with these weights).
    tol = (1e-5 if dtype == jnp.float32 else 2e-2) * max(1.0, float(np.abs(y_ref32).max()))
    np.testing.assert_allclose(y32, y_ref32, atol=tol, rtol=0)
    np.testing.assert_array_equal(y32[~evict], 0)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), atol=1e-5 if dtype == jnp.float32 else 1e-2,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(s)[~evict], np.asarray(inputs[3])[~evict])  # not evicting: untouched
    assert float(jnp.abs(s - inputs[3])[evict].max()) > 1e-3  # evicting: the state moved


def test_gather_outside_the_kernel_gives_the_same_result():
    """The fallback (XLA gathers the evicted rows, the kernel reads index 0) equals the in-kernel ring gather."""
    mem = _memory(GatedDeltaNetMemory, 16, seed=5)
    ring_k, ring_v, gates, state, q, u, positions = _step_inputs(mem, 16, jnp.float32, seed=6)
    pos = positions[:, 0]
    slot = (pos - WINDOW - SINKS) % RING
    evict = pos >= first_memory_query(WINDOW, SINKS)

    def run(gather_in_kernel):
        return memory_decode.fused_delta_decode(
            state[:, 0], q[:, 0], ring_k, ring_v, gates["beta"], gates["g"], slot, evict, u[:, 0],
            mem.g_proj[...], mem.o_norm[...], mem.o_proj[...], scale=16 ** -0.5, norm_eps=mem.norm_eps,
            gather_in_kernel=gather_in_kernel)

    (y_in, s_in), (y_out, s_out) = run(True), run(False)
    np.testing.assert_allclose(np.asarray(y_out), np.asarray(y_in), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(s_out), np.asarray(s_in), atol=1e-6, rtol=0)
    y_ref, _ = _run(mem, (ring_k, ring_v, gates, state, q, u, positions), fused=False)
    np.testing.assert_allclose(np.asarray(y_out), np.asarray(y_ref[:, 0]), atol=1e-5, rtol=0)


def test_bad_shapes_name_the_tensor():
    mem = _memory(DeltaNetMemory, 16, seed=7)
    ring_k, ring_v, gates, state, q, u, _ = _step_inputs(mem, 16, jnp.float32, seed=8)
    slot, evict = jnp.zeros((4,), jnp.int32), jnp.ones((4,), bool)
    args = dict(state=state[:, 0], q=q[:, 0], ring_k=ring_k, ring_v=ring_v, beta=gates["beta"], g=None, slot=slot,
                evict=evict, u=u[:, 0], g_proj=mem.g_proj[...], o_norm=mem.o_norm[...], o_proj=mem.o_proj[...])
    for name, bad in (("state", state), ("beta", gates["beta"][:, :3]), ("ring_k", ring_k[:, :, :, :8]),
                      ("o_proj", mem.o_proj[...][:2])):
        with pytest.raises(ValueError, match=name):
            memory_decode.fused_delta_decode(**{**args, name: bad}, scale=0.25, norm_eps=1e-5)


def test_split_form_rejects_a_block_that_does_not_divide_head_dim():
    mem = _memory(DeltaNetMemory, 16, seed=7)
    ring_k, ring_v, gates, state, q, u, _ = _step_inputs(mem, 16, jnp.float32, seed=8)
    with pytest.raises(ValueError, match="block_v"):
        memory_decode.fused_delta_decode(state[:, 0], q[:, 0], ring_k, ring_v, gates["beta"], None,
                                         jnp.zeros((4,), jnp.int32), jnp.ones((4,), bool), u[:, 0], mem.g_proj[...],
                                         mem.o_norm[...], mem.o_proj[...], scale=0.25, norm_eps=1e-5, block_v=5)


def test_only_evicted_delta_rule_memories_are_fused():
    assert fuses_memory_decode(make("gated_deltanet", 5, 3).memories[0])
    assert fuses_memory_decode(make("deltanet", 6, 0).memories[0])
    assert not fuses_memory_decode(make("mamba2", 5, 3).memories[0])


@pytest.mark.parametrize("memory,window,sinks,block_v,columns", [
    ("gated_deltanet", 5, 3, None, None), ("deltanet", 6, 0, None, None), ("gated_deltanet", 5, 3, 4, None),
    ("gated_deltanet", 5, 3, None, 4), ("deltanet", 6, 0, None, 8)])
def test_prefill_then_fused_decode_equals_parallel_forward(memory, window, sinks, block_v, columns, monkeypatch):
    calls = []
    name = "fused_delta_decode_columns" if columns else "fused_delta_decode"
    kernel = getattr(memory_decode, name)
    monkeypatch.setattr(memory_decode, name, lambda *a, **k: calls.append(k["block_v"]) or kernel(*a, **k))
    monkeypatch.setattr(decode, "FUSED_MEMORY_DECODE", True)
    monkeypatch.setattr(decode, "FUSED_MEMORY_BLOCK_V", block_v)
    monkeypatch.setattr(decode, "FUSED_MEMORY_COLUMNS", columns)
    block_v = columns or block_v
    model = make(memory, window, sinks)
    ids = random_ids(2, 14, seed=1)
    ref = parallel_logits(model, ids)
    dec = Decoder(model)
    # A prompt shorter than sinks + window: decode fills the window, then evicts through the kernel.
    _, cache = dec.prefill(ids[:, :4], chunk=4)
    for t in range(4, ids.shape[1]):
        logits, cache = dec.decode(ids[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, t]), atol=1e-4, rtol=0,
                                   err_msg=f"fused decode at position {t}")
    assert calls and set(calls) == {block_v}, "the fused kernel (in the asked form) never reached the jitted step"


def test_fused_greedy_loop_matches_the_xla_greedy_loop(monkeypatch):
    """Decoder.greedy compiles its own loop: the switch must reach it too (and give the same tokens)."""
    model = make("gated_deltanet", 5, 3)
    ids = random_ids(2, 9, seed=2)
    # batch 2 x 4 heads: FUSED_MEMORY_COLUMNS="auto" picks the column form
    out, traced = greedy_with_switch_off_and_on(monkeypatch, Decoder(model), ids, 4, "FUSED_MEMORY_DECODE",
                                                memory_decode, "fused_delta_decode_columns")
    assert traced, "the greedy loop never traced the fused kernel"
    np.testing.assert_array_equal(np.asarray(out[True]), np.asarray(out[False]))


def test_auto_columns_rule():
    """The column form where the one-kernel form has fewer programs than an H100 has SMs (batch 1 of Qwen2.5-3B: 16),
    the one-kernel form from there (batch 32: 512), and never for a head size 16 does not divide."""
    assert decode.auto_memory_columns(1, 16, 128) == 16
    assert decode.auto_memory_columns(8, 16, 128) == 16
    assert decode.auto_memory_columns(9, 16, 128) is None
    assert decode.auto_memory_columns(32, 16, 128) is None
    assert decode.auto_memory_columns(1, 16, 24) is None


def test_auto_switch_fuses_on_gpus_only(monkeypatch):
    for value, want in (("auto", jax.default_backend() == "gpu"), (True, True), (False, False)):
        monkeypatch.setattr(decode, "FUSED_MEMORY_DECODE", value)
        assert decode.fused_memory_decode_enabled() is want
