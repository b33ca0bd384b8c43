"""AHN memory modules (GDN, DN, Mamba2): parallel == step loop, chunk == recurrent through the module, gates and the
AHN head against hand-written float64 formulas, zero-init o_proj, shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.models.memory.deltanet import DeltaNetMemory
from ahn_jax.models.memory.gated_deltanet import GatedDeltaNetMemory
from ahn_jax.models.memory.mamba2 import Mamba2Memory

B, N, D, H, DH = 2, 13, 24, 2, 8
KINDS = ("gated_deltanet", "deltanet", "mamba2")
CLASSES = {"gated_deltanet": GatedDeltaNetMemory, "deltanet": DeltaNetMemory, "mamba2": Mamba2Memory}


def make(kind, seed=0, randomize=True, **kw):
    mem = CLASSES[kind](D, H, DH, rngs=nnx.Rngs(seed), **kw)
    if randomize:  # every parameter random (o_proj included) so that nothing is hidden behind a zero or a one
        rng = np.random.default_rng(seed + 100)  # numpy: no per-shape XLA compiles in tests
        for path, var in nnx.to_flat_state(nnx.state(mem, MemoryParam)):
            name = path[-1]
            noise = rng.normal(size=var.shape).astype(np.float32)
            getattr(mem, name)[...] = jnp.asarray(1.0 + 0.3 * noise if name in ("o_norm", "norm") else 0.3 * noise)
    return mem


def inputs(seed=1, n=N, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(ks[i], (B, n, H, DH), dtype) for i in range(3))
    u_w = jax.random.normal(ks[3], (B, n, D), dtype)
    u_r = jax.random.normal(ks[4], (B, n, D), dtype)
    return q, k, v, u_w, u_r


@nnx.jit
def run(mem, q, k, v, u_w, u_r, s0=None):
    return mem(q, k, v, mem.write_gates(u_w), u_r, initial_state=s0, output_final_state=True)


@nnx.jit
def step(mem, q_t, k_t, v_t, gates_t, u_r_t, state):
    return mem.step(q_t, k_t, v_t, gates_t, u_r_t, state)


def np_params(mem):
    return {path[-1]: np.asarray(var[...], np.float64) for path, var in nnx.to_flat_state(nnx.state(mem, MemoryParam))}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def reference(kind, p, q, k, v, u_w, u_r):
    """The whole cell in float64 numpy, token by token, straight from spec/AHN.md §2.1-2.3 and §1.5."""
    q, k, v, u_w, u_r = (np.asarray(t, np.float64) for t in (q, k, v, u_w, u_r))
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    o = np.zeros_like(v)
    if kind == "mamba2":
        dt = softplus(u_w @ p["dt_proj"] + p["dt_proj_bias"] + p["dt_bias"])
        a = -np.exp(p["A_log"])
    else:
        beta = sigmoid(u_w @ p["b_proj"])
        g = -np.exp(p["A_log"]) * softplus(u_w @ p["a_proj"] + p["dt_bias"]) if kind == "gated_deltanet" else 0 * beta
    for b in range(q.shape[0]):
        for h in range(H):
            m = np.zeros((DH, DH))
            for i in range(q.shape[1]):
                if kind == "mamba2":  # M [P, N]
                    m = np.exp(dt[b, i, h] * a[h]) * m + dt[b, i, h] * np.outer(v[b, i, h], kn[b, i, h])
                    o[b, i, h] = m @ qn[b, i, h]
                else:  # M [K, V]
                    kk = kn[b, i, h]
                    m = np.exp(g[b, i, h]) * m
                    m = m - beta[b, i, h] * np.outer(kk, kk @ m) + beta[b, i, h] * np.outer(kk, v[b, i, h])
                    o[b, i, h] = m.T @ qn[b, i, h] / np.sqrt(DH)
    if kind == "mamba2":
        z = u_r @ p["g_proj"] + p["g_proj_bias"]
        gated = (o * (z * sigmoid(z))[..., None]).reshape(*o.shape[:2], H * DH)
        normed = gated / np.sqrt(np.mean(gated ** 2, -1, keepdims=True) + 1e-5) * p["norm"]
        normed = normed.reshape(o.shape)
    else:
        gam = u_r @ p["g_proj"]
        normed = o / np.sqrt(np.mean(o ** 2, -1, keepdims=True) + 1e-5) * p["o_norm"] * (gam * sigmoid(gam))[..., None]
    y = np.einsum("bnhi,hio->bnho", normed, p["o_proj"])
    return y.reshape(*y.shape[:2], H * DH)


@pytest.mark.parametrize("kind", KINDS)
def test_module_matches_float64_reference(kind):
    mem = make(kind)
    q, k, v, u_w, u_r = inputs()
    y, _ = run(mem, q, k, v, u_w, u_r)
    assert mem(q[:, :2], k[:, :2], v[:, :2], mem.write_gates(u_w[:, :2]), u_r[:, :2])[1] is None
    want = reference(kind, np_params(mem), q, k, v, u_w, u_r)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gates_match_hand_formulas(kind):
    mem = make(kind)
    u = inputs()[3]
    gates = mem.write_gates(u)
    p, un = np_params(mem), np.asarray(u, np.float64)
    if kind == "mamba2":
        assert set(gates) == {"dt"}
        np.testing.assert_allclose(gates["dt"], un @ p["dt_proj"] + p["dt_proj_bias"], rtol=1e-5, atol=1e-6)
    else:
        assert set(gates) == ({"beta", "g"} if kind == "gated_deltanet" else {"beta"})
        np.testing.assert_allclose(gates["beta"], sigmoid(un @ p["b_proj"]), rtol=1e-5, atol=1e-6)
        if kind == "gated_deltanet":
            g = -np.exp(p["A_log"]) * softplus(un @ p["a_proj"] + p["dt_bias"])
            np.testing.assert_allclose(gates["g"], g, rtol=1e-5, atol=1e-6)
            assert gates["g"].dtype == jnp.float32
    for leaf in jax.tree.leaves(gates):
        assert leaf.shape == (B, N, H) and leaf.dtype == jnp.float32


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_equals_step_loop(kind):
    mem = make(kind)
    q, k, v, u_w, u_r = inputs(seed=3)
    gates = mem.write_gates(u_w)
    s0 = jax.random.normal(jax.random.PRNGKey(7), mem.init_state(B).shape) * 0.1  # a non-zero carried-in state
    for init in (None, s0):
        y, final = run(mem, q, k, v, u_w, u_r, init)
        state = mem.init_state(B) if init is None else init
        assert state.dtype == jnp.float32 and state.shape == (B, H, DH, DH)
        ys = []
        for i in range(N):
            y_t, state = step(mem, q[:, i], k[:, i], v[:, i], jax.tree.map(lambda a: a[:, i], gates), u_r[:, i], state)
            ys.append(y_t)
        np.testing.assert_allclose(np.stack(ys, 1), y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state, final, rtol=1e-5, atol=1e-5)


@nnx.jit
def _loss_and_grads(mem, q, k, v, u_w, u_r, w):
    """sum(y * w) and its gradients wrt the memory parameters and q, k, v (compiled once per module config)."""
    graphdef, params, rest = nnx.split(mem, MemoryParam, ...)

    def loss(params, q, k, v):
        m = nnx.merge(graphdef, params, rest)
        y, _ = m(q, k, v, m.write_gates(u_w), u_r)
        return jnp.sum(y * w)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(params, q, k, v)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_impl_equals_recurrent_impl_through_module(kind):
    q, k, v, u_w, u_r = inputs(seed=4)
    w = jax.random.normal(jax.random.PRNGKey(5), (B, N, H * DH))
    results = {}
    for impl in ("recurrent", "chunk"):
        mem = make(kind, impl=impl, chunk_size=4)  # N = 13: padding of the last chunk is exercised
        results[impl] = _loss_and_grads(mem, q, k, v, u_w, u_r, w)
    (l_r, g_r), (l_c, g_c) = results["recurrent"], results["chunk"]
    np.testing.assert_allclose(l_c, l_r, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_module_outputs_exact_zero_and_grad_reaches_o_proj(kind):
    mem = make(kind, randomize=False, impl="chunk", chunk_size=4)  # as initialised: o_proj == 0
    q, k, v, u_w, u_r = inputs(seed=6)
    y, _ = run(mem, q, k, v, u_w, u_r)
    assert y.shape == (B, N, H * DH)
    assert bool(jnp.all(y == 0))
    w = jax.random.normal(jax.random.PRNGKey(8), y.shape)
    _, grads = _loss_and_grads(mem, q, k, v, u_w, u_r, w)
    g_o = grads[0]["o_proj"][...]
    assert bool(jnp.all(jnp.isfinite(g_o))) and float(jnp.abs(g_o).min()) >= 0 and float(jnp.abs(g_o).max()) > 1e-3
    # with W_o = 0 nothing upstream of it gets gradient yet (spec/AHN.md §1.5)
    assert float(jnp.abs(grads[0]["g_proj"][...]).max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_zero_padded_rows_keep_gradients_finite(kind):
    """The hybrid pads shifted inputs with zero rows when window/sinks are traced: no NaN may come back."""
    mem = make(kind, impl="chunk", chunk_size=4)
    q, k, v, u_w, u_r = inputs(seed=10)
    q, k, v = (t.at[:, -3:].set(0.0) for t in (q, k, v))
    w = jax.random.normal(jax.random.PRNGKey(11), (B, N, H * DH))
    _, grads = _loss_and_grads(mem, q, k, v, u_w, u_r, w)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).max()) < 1e6


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_activations_close_to_float32(kind):
    q, k, v, u_w, u_r = inputs(seed=9)
    mem = make(kind)
    y32, _ = run(mem, q, k, v, u_w, u_r)
    y16, _ = run(mem, *[t.astype(jnp.bfloat16) for t in (q, k, v, u_w, u_r)])
    assert y16.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
    assert err < 2e-2, err


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_float32_memory_params(kind):
    mem = make(kind, randomize=False)
    leaves = jax.tree.leaves(nnx.state(mem, MemoryParam))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    assert len(jax.tree.leaves(nnx.state(mem, MemoryParam))) == len(jax.tree.leaves(nnx.state(mem, nnx.Param)))


@pytest.mark.parametrize("kind", KINDS)
def test_clear_errors_on_bad_shapes(kind):
    mem = make(kind, randomize=False)
    q, k, v, u_w, u_r = inputs()
    gates = mem.write_gates(u_w)
    with pytest.raises(ValueError, match="k must be"):
        mem(q, k[..., :4], v, gates, u_r)
    with pytest.raises(ValueError, match="u_read"):
        mem(q, k, v, gates, u_r[:, :3])
    with pytest.raises(ValueError, match="u_written"):
        mem.write_gates(u_w[..., :5])
    with pytest.raises(ValueError, match="q must be"):
        mem.step(q, k[:, 0], v[:, 0], gates, u_r[:, 0], mem.init_state(B))
