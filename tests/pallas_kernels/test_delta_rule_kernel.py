"""The Pallas (gated) delta rule kernel against plain recurrences, in interpret mode on CPU: forward, final state and
the VJP with respect to every input (q, k, v, g, beta, initial_state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import delta_rule as kernel


def _numpy_recurrence(q, k, v, g, beta, h0, scale):
    """Token-by-token float64 reference: S <- e^g S; v' = beta (v - S^T k); S <- S + k v'^T; o = scale S^T q."""
    q, k, v, beta, h0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, h0))
    g = None if g is None else np.asarray(g, np.float64)
    b, t, h, _ = q.shape
    o = np.zeros(v.shape)
    s = h0.copy()
    for i in range(t):
        if g is not None:
            s = s * np.exp(g[:, i])[:, :, None, None]
        pred = np.einsum("bhkv,bhk->bhv", s, k[:, i])
        upd = beta[:, i][..., None] * (v[:, i] - pred)
        s = s + np.einsum("bhk,bhv->bhkv", k[:, i], upd)
        o[:, i] = scale * np.einsum("bhkv,bhk->bhv", s, q[:, i])
    return o, s


def _scan_recurrence(q, k, v, g, beta, h0, scale):
    """The same recurrence as a jax.lax.scan (float32), differentiable: the gradient reference."""
    def step(s, xs):
        qt, kt, vt, gt, bt = xs
        if gt is not None:
            s = s * jnp.exp(gt)[:, :, None, None]
        upd = bt[..., None] * (vt - jnp.einsum("bhkv,bhk->bhv", s, kt))
        s = s + jnp.einsum("bhk,bhv->bhkv", kt, upd)
        return s, scale * jnp.einsum("bhkv,bhk->bhv", s, qt)

    tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    s, o = jax.lax.scan(step, h0, (tm(q), tm(k), tm(v), tm(g), tm(beta)))
    return jnp.moveaxis(o, 0, 1), s


def _inputs(seed, b, t, h, dk, dv, gated):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    # L2-normalised keys/queries as the op wrapper passes them (keeps the recurrence contractive).
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 2.0) if gated else None
    beta = jax.random.uniform(ks[4], (b, t, h), minval=0.05, maxval=1.0)
    h0 = jax.random.normal(ks[5], (b, h, dk, dv)) * 0.5
    return q, k, v, g, beta, h0


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


CASES = [
    # (seed, B, T, H, K, V, chunk, block_v, gated, with initial state)
    (0, 1, 37, 2, 16, 32, 16, 16, True, True),   # T not a multiple of the chunk, V split in two blocks
    (1, 2, 48, 1, 32, 16, 16, None, True, False),  # T a multiple, no initial state
    (2, 1, 21, 2, 16, 16, 8, 16, False, True),   # plain delta rule
    (3, 1, 70, 1, 16, 32, 64, 32, True, True),   # default chunk 64, partial second chunk
]


# Forward only where the VJP test does not already cover the case (plain delta rule forward: the adapter test below).
@pytest.mark.parametrize("seed,b,t,h,dk,dv,chunk,block_v,gated,use_h0", [CASES[0], CASES[3]])
def test_forward_matches_float64_recurrence(seed, b, t, h, dk, dv, chunk, block_v, gated, use_h0):
    q, k, v, g, beta, h0 = _inputs(seed, b, t, h, dk, dv, gated)
    h0 = h0 if use_h0 else None
    run = jax.jit(lambda *a: kernel.gated_delta_rule(*a, scale=0.7, initial_state=h0, output_final_state=True,
                                                     chunk_size=chunk, block_v=block_v, interpret=True))
    o, ht = run(q, k, v, g, beta)
    o_ref, ht_ref = _numpy_recurrence(q, k, v, g, beta, np.zeros((b, h, dk, dv)) if h0 is None else h0, 0.7)
    assert o.shape == (b, t, h, dv) and ht.shape == (b, h, dk, dv)
    assert np.all(np.isfinite(np.asarray(o)))
    assert _rel(o, o_ref) < 1e-4, _rel(o, o_ref)
    assert _rel(ht, ht_ref) < 1e-4, _rel(ht, ht_ref)


@pytest.mark.parametrize("seed,b,t,h,dk,dv,chunk,block_v,gated,use_h0", CASES[:3])
def test_vjp_matches_scan_reference(seed, b, t, h, dk, dv, chunk, block_v, gated, use_h0):
    q, k, v, g, beta, h0 = _inputs(seed, b, t, h, dk, dv, gated)
    cot = jax.random.normal(jax.random.PRNGKey(100 + seed), (b, t, h, dv))
    cot_s = jax.random.normal(jax.random.PRNGKey(200 + seed), (b, h, dk, dv))

    def loss_kernel(q, k, v, g, beta, h0):
        o, ht = kernel.gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True,
                                        chunk_size=chunk, block_v=block_v, interpret=True)
        return jnp.sum(o * cot) + jnp.sum(ht * cot_s)

    def loss_ref(q, k, v, g, beta, h0):
        o, ht = _scan_recurrence(q, k, v, g, beta, h0, 0.7)
        return jnp.sum(o * cot) + jnp.sum(ht * cot_s)

    argnums = (0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 4, 5)
    # jit: interpret mode run eagerly dispatches every op of the kernel body one by one (slow on CPU).
    grads = jax.jit(jax.grad(loss_kernel, argnums=argnums))(q, k, v, g, beta, h0)
    grads_ref = jax.grad(loss_ref, argnums=argnums)(q, k, v, g, beta, h0)
    names = [n for n in ("q", "k", "v", "g", "beta", "h0") if gated or n != "g"]
    for name, got, want in zip(names, grads, grads_ref):
        assert got.shape == want.shape, name
        assert np.all(np.isfinite(np.asarray(got))), name
        assert _rel(got, want) < 2e-4, (name, _rel(got, want))


def test_zero_initial_state_equals_none_and_final_state_optional():
    q, k, v, g, beta, h0 = _inputs(5, 1, 20, 1, 16, 16, True)
    o1, s1 = jax.jit(lambda *a: kernel.gated_delta_rule(*a, chunk_size=8, interpret=True))(q, k, v, g, beta)
    o2, s2 = jax.jit(lambda *a: kernel.gated_delta_rule(*a, chunk_size=8, interpret=True, output_final_state=True,
                                                        initial_state=jnp.zeros_like(h0)))(q, k, v, g, beta)
    assert s1 is None and s2.shape == h0.shape
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), rtol=1e-6, atol=1e-6)


def test_bad_shapes_name_the_tensor():
    q, k, v, g, beta, h0 = _inputs(6, 1, 8, 1, 16, 16, True)
    with pytest.raises(ValueError, match="beta"):
        kernel.gated_delta_rule(q, k, v, g, beta[:, :4], interpret=True)
    with pytest.raises(ValueError, match="initial_state"):
        kernel.gated_delta_rule(q, k, v, g, beta, initial_state=h0[:, :, :8], interpret=True)
    with pytest.raises(ValueError, match="block_v"):
        kernel.gated_delta_rule(q, k, v, g, beta, block_v=5, interpret=True)


def test_op_dispatch_adapter_matches_op_reference():
    """The adapter registered as impl="pallas" follows ahn_jax.ops' calling convention and matches its reference."""
    from ahn_jax.ops import gated_delta as ops_dr

    q, k, v, g, beta, h0 = _inputs(7, 1, 27, 2, 16, 16, True)
    o, s = jax.jit(lambda *a: kernel.gated_delta_rule_impl(*a, scale=0.5, initial_state=h0, chunk_size=8))(
        q, k, v, g, beta)
    o_ref, s_ref = ops_dr.gated_delta_rule(q, k, v, g, beta, scale=0.5, initial_state=h0, output_final_state=True,
                                           impl="recurrent")
    assert _rel(o, o_ref) < 1e-4 and _rel(s, s_ref) < 1e-4
    o2, _ = jax.jit(lambda *a: kernel.delta_rule_impl(*a, scale=0.5, chunk_size=8))(q, k, v, beta)
    o2_ref, _ = ops_dr.delta_rule(q, k, v, beta, scale=0.5, impl="recurrent")
    assert _rel(o2, o2_ref) < 1e-4


# Chunk 64: four 16x16 blocks (the GPU case); chunk 32 two blocks, plain rule, bf16 in/out. The single-block path
# (chunk 8) runs inside the VJP tests above, which compare the whole forward with the references.
@pytest.mark.parametrize("chunk,gated,dtype", [(64, True, jnp.float32), (32, False, jnp.bfloat16)])
def test_wy_kernel_matches_xla_wy_factors(chunk, gated, dtype):
    """The on-chip blocked triangular inverse (16x16 blocks; one block for chunk 8) equals XLA's triangular_solve."""
    from pallas_kernels.common import chunk_cumsum, wy_factors

    b, n, h, dk, dv = 2, 2, 2, 16, 32
    t = n * chunk
    q, k, v, g, beta, _ = _inputs(11 + chunk, b, t, h, dk, dv, gated)
    del q
    # Strongly correlated keys (a shared direction) make A far from the identity, so the inverse is really exercised.
    k = k + 2.0 * k[:, :1]
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = v.astype(dtype)
    gc = chunk_cumsum(g, chunk) if gated else None
    w, u = jax.jit(lambda *a: kernel.wy_factors_pallas(*a, chunk, interpret=True))(k, v, beta, gc)
    w_ref, u_ref = wy_factors(k.astype(jnp.float32), v.astype(jnp.float32), beta, gc, chunk)
    assert w.dtype == dtype and u.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel(w, w_ref) < tol, _rel(w, w_ref)
    assert _rel(u, u_ref) < tol, _rel(u, u_ref)


BACKWARD_VARIANTS = [
    # The round 1-3 preparation backward: XLA triangular_solve + jax.vjp.
    dict(WY_BWD="jax_vjp"),
    # Pallas WY + VJP kernels with a wider backward V block.
    dict(WY_BWD="pallas", BWD_BLOCK_V=32),
    # Explicit XLA VJP with the triangular solve against I.
    dict(WY_BWD="explicit", WY_BWD_INVERSE="solve"),
    # The default path with the dq/dk/dw kernel split in 2 K blocks and 4 V blocks looped inside.
    dict(DQKW_BLOCK_K=8, DQKW_BLOCK_V=8),
]


@pytest.mark.parametrize("knobs", BACKWARD_VARIANTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_backward_variants_match_scan(monkeypatch, knobs):
    """Every backward variant behind the module switches (kept for timing old vs new) against the scan's gradients,
    gated, with an initial state, T not a multiple of the chunk and two V blocks."""
    q, k, v, g, beta, h0 = _inputs(9, 1, 19, 1, 16, 32, True)
    cot = jax.random.normal(jax.random.PRNGKey(99), (1, 19, 1, 32))

    def loss(q, k, v, g, beta, h0):
        o, ht = kernel.gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True,
                                        chunk_size=8, block_v=16, interpret=True)
        return jnp.sum(o * cot) + jnp.sum(ht)

    def loss_ref(q, k, v, g, beta, h0):
        o, ht = _scan_recurrence(q, k, v, g, beta, h0, 0.7)
        return jnp.sum(o * cot) + jnp.sum(ht)

    for name, value in knobs.items():
        assert hasattr(kernel, name), name
        monkeypatch.setattr(kernel, name, value)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, g, beta, h0)
    want = jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, g, beta, h0)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), got, want):
        assert _rel(a, b) < 2e-4, (name, _rel(a, b))


def test_unknown_backward_switch_is_named(monkeypatch):
    q, k, v, g, beta, _ = _inputs(4, 1, 8, 1, 16, 16, True)
    monkeypatch.setattr(kernel, "WY_BWD", "sideways")
    with pytest.raises(ValueError, match="WY_BWD"):
        jax.grad(lambda q: jnp.sum(kernel.gated_delta_rule(q, k, v, g, beta, chunk_size=8, interpret=True)[0]))(q)
