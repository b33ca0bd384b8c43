"""AllMem TTT-MLP memory module: alpha = 0 gives y == 0 with gradient reaching alpha, prefill + step == parallel
(unaligned split), gates and wiring against hand formulas + the op, warm start from attention, both qkv sources."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ahn_jax.models.memory.base import MemoryParam
from ahn_jax.models.memory.ttt_mlp import TTTMLPMemory
from ahn_jax.ops.ttt import ttt_mlp

B, N, D, H, DK, C = 2, 11, 24, 2, 8, 4


def make(source="own", randomize=True, seed=0, **kw):
    mem = TTTMLPMemory(D, H, DK, chunk_size=C, qkv_source=source, rngs=nnx.Rngs(seed), **kw)
    if randomize:  # random gate weights and alpha too, so that nothing hides behind a zero
        rng = np.random.default_rng(seed + 10)
        for path, var in nnx.to_flat_state(nnx.state(mem, MemoryParam)):
            if path[-1] in ("lr_proj", "mom_proj", "alpha", "q_offset", "k_offset"):
                getattr(mem, path[-1])[...] = jnp.asarray(0.2 * rng.normal(size=var.shape), jnp.float32)
    return mem


def inputs(seed=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(ks[i], (B, N, H, DK)) for i in range(3))
    return q, k, v, jax.random.normal(ks[3], (B, N, D))


@nnx.jit
def run(mem, q, k, v, u):
    return mem(q, k, v, mem.write_gates(u), u, output_final_state=True)


@nnx.jit
def step(mem, q_t, k_t, v_t, gates_t, u_t, state):
    return mem.step(q_t, k_t, v_t, gates_t, u_t, state)


def test_alpha_zero_gives_exact_zero_and_gradient_reaches_alpha():
    mem = make(randomize=False)
    q, k, v, u = inputs()
    y, _ = run(mem, q, k, v, u)
    assert y.shape == (B, N, D) and bool(jnp.all(y == 0))
    # gradient wrt alpha only (the other parameters get theirs through alpha, i.e. zero at this point)
    graphdef, alpha, rest = nnx.split(mem, lambda path, _: path[-1] == "alpha", ...)
    w = jax.random.normal(jax.random.PRNGKey(3), y.shape)

    def loss(alpha):
        m = nnx.merge(graphdef, alpha, rest)
        return jnp.sum(m.parallel_all(None, None, None, u) * w)

    g = jax.jit(jax.grad(loss))(alpha)["alpha"][...]
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 1e-4


@pytest.mark.parametrize("source", ["own", "attn_pre_rope"])
def test_parallel_equals_step_loop(source):
    mem = make(source)
    q, k, v, u = inputs(seed=2)
    y, final = run(mem, q, k, v, u)
    state = mem.init_state(B)
    gates = mem.write_gates(u)
    ys = []
    for i in range(N):  # N = 11, C = 4: two chunk writes, then three pending tokens
        y_t, state = step(mem, q[:, i], k[:, i], v[:, i], jax.tree.map(lambda a: a[:, i], gates), u[:, i], state)
        ys.append(y_t)
    np.testing.assert_allclose(np.stack(ys, 1), y, rtol=1e-5, atol=1e-6)
    assert int(state["pos"]) == N == int(final["pos"]) and int(state["pending"].count) == N % C
    for a, b in zip(jax.tree.leaves(state["fast"]), jax.tree.leaves(final["fast"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a prefill that stops mid-chunk, then decode: same outputs
    y7, mid = run(mem, q[:, :7], k[:, :7], v[:, :7], u[:, :7])
    ys = [y7]
    for i in range(7, N):
        y_t, mid = step(mem, q[:, i], k[:, i], v[:, i], jax.tree.map(lambda a: a[:, i], gates), u[:, i], mid)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(np.concatenate(ys, 1), y, rtol=1e-5, atol=1e-6)


def test_gates_and_wiring_match_hand_formulas():
    mem = make()
    q_proj, k_proj, v_proj, o_proj = (np.random.default_rng(i).normal(size=s).astype(np.float32) * 0.2
                                      for i, s in enumerate([(D, H * DK), (D, DK), (D, DK), (H * DK, D)]))
    qn, kn = (1 + 0.1 * np.random.default_rng(9 + i).normal(size=DK).astype(np.float32) for i in range(2))
    mem.init_from_attention(q_proj, k_proj, v_proj, o_proj, q_norm=qn, k_norm=kn)  # one KV head: repeated to 2
    np.testing.assert_array_equal(mem.k_proj[...][:, :DK], mem.k_proj[...][:, DK:])
    _, _, _, u = inputs(seed=4)
    gates = mem.write_gates(u)
    un = np.asarray(u, np.float64)
    p = {path[-1]: np.asarray(var[...], np.float64) for path, var in nnx.to_flat_state(nnx.state(mem, MemoryParam))}
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    np.testing.assert_allclose(gates["lr"], softplus(un @ p["lr_proj"] + p["lr_bias"]).reshape(B, N, H, 3),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gates["momentum"], 1 / (1 + np.exp(-(un @ p["mom_proj"] + p["mom_bias"]))),
                               rtol=1e-5, atol=1e-7)

    def qk(w, norm):
        x = (un @ w).reshape(B, N, H, DK)
        x = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * norm
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    k_hat = qk(np.repeat(k_proj.reshape(D, 1, DK), H, 1).reshape(D, H * DK), kn)
    np.testing.assert_allclose(gates["k"], k_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gates["v"], (un @ np.tile(v_proj, (1, H))).reshape(B, N, H, DK), rtol=1e-5,
                               atol=1e-6)
    y, _ = mem(None, None, None, gates, u)
    w0 = (mem.w0_0[...], mem.w0_1[...], mem.w0_2[...])
    o, _ = ttt_mlp(jnp.asarray(qk(q_proj, qn), jnp.float32), gates["k"], gates["v"], gates["lr"],
                   gates["momentum"], w0, chunk_size=C)
    want = (np.asarray(o, np.float64).reshape(B, N, H * DK) @ o_proj) * p["alpha"]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-6)


def test_initial_gates_are_eta_base_and_momentum_init():
    mem = make(randomize=False, eta_base=0.03, momentum_init=0.8)
    g = mem.write_gates(inputs()[3])
    np.testing.assert_allclose(g["lr"], 0.03, rtol=1e-5)
    np.testing.assert_allclose(g["momentum"], 0.8, rtol=1e-5)


def test_clear_errors():
    mem = make(randomize=False)
    with pytest.raises(ValueError, match=r"k_proj must be \[24, Hkv\*8\]"):
        mem.init_from_attention(np.zeros((D, H * DK)), np.zeros((D, 5)), np.zeros((D, DK)), np.zeros((H * DK, D)))
    with pytest.raises(ValueError, match="u_written"):
        mem.write_gates(jnp.zeros((B, N, D + 1)))
    with pytest.raises(ValueError, match="qkv_source"):
        TTTMLPMemory(D, H, DK, qkv_source="attn", rngs=nnx.Rngs(0))
    pre = make("attn_pre_rope", randomize=False)
    u = inputs()[3]
    with pytest.raises(ValueError, match="k must end in"):
        pre(jnp.ones((B, N, H, DK)), None, jnp.ones((B, N, H, DK)), pre.write_gates(u), u)


def test_init_from_attention_copies_float32_weights():
    # The trainer donates the memory's buffers every step; a memory weight that shares the frozen attention's buffer
    # (what asarray gives for a float32 base) made the first AllMem step fail on GPU with "buffer donated twice".
    mem = make()
    hq = jnp.asarray(np.random.default_rng(0).normal(size=(D, H * DK)), jnp.float32)
    hkv = jnp.asarray(np.random.default_rng(1).normal(size=(D, H * DK)), jnp.float32)  # as many KV heads as q heads
    ho = jnp.asarray(np.random.default_rng(2).normal(size=(H * DK, D)), jnp.float32)
    norm = jnp.ones((DK,), jnp.float32)
    mem.init_from_attention(hq, hkv, hkv, ho, q_norm=norm, k_norm=norm)
    frozen = {id(x): x.unsafe_buffer_pointer() for x in (hq, hkv, ho, norm)}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        value = getattr(mem, name)[...]
        assert value.unsafe_buffer_pointer() not in frozen.values(), name
    np.testing.assert_array_equal(mem.q_proj[...], hq)
    np.testing.assert_array_equal(mem.o_proj[...], ho)
