"""The Pallas WY-preparation kernels of the delta rule (pallas_kernels/delta_rule_wy.py) in interpret mode on CPU:
forward (both diagonal-block inverses) against XLA's triangular solve, and the VJP kernel against jax.vjp of the XLA
preparation (pallas_kernels.common.wy_factors) with respect to k, v, beta and the chunk-local cumsum gc."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import delta_rule_wy as wy
from pallas_kernels.common import chunk_cumsum, unit_lower_inverse, wy_factors, wy_factors_and_vjp


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _chunk_inputs(seed, b, t, h, dk, dv, chunk, gated, correlated):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    k = jax.random.normal(ks[0], (b, t, h, dk))
    if correlated:  # a shared direction: A far from the identity, so the inverse is really exercised
        k = k + 2.0 * k[:, :1]
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (b, t, h, dv))
    beta = jax.random.uniform(ks[2], (b, t, h), minval=0.05, maxval=1.0)
    gc = chunk_cumsum(jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 1.0), chunk) if gated else None
    dw = jax.random.normal(ks[4], (b, t, h, dk))
    du = jax.random.normal(ks[5], (b, t, h, dv))
    return k, v, beta, gc, dw, du


# (chunk, gated, inverse): chunk 64 = four 16x16 blocks (the GPU case), 32 = two, 8 = one block (not a multiple of 16).
# "product" is the default inverse (WY_INVERSE); the substitution variant's larger gated case runs in the slow suite.
CASES = [pytest.param(64, True, "substitution", marks=pytest.mark.slow), (32, False, "substitution"),
         (8, True, "product"), (64, True, "product")]


@pytest.mark.parametrize("chunk,gated,method", CASES)
def test_wy_vjp_kernel_matches_jax_vjp_of_xla_preparation(chunk, gated, method):
    b, h, dk, dv = 1, 1, 16, 32
    t = 2 * chunk
    k, v, beta, gc, dw, du = _chunk_inputs(chunk + gated, b, t, h, dk, dv, chunk, gated, correlated=True)

    def xla(k, v, beta, gc):
        return wy_factors(k, v, beta, gc, chunk)

    if gated:
        _, vjp = jax.vjp(xla, k, v, beta, gc)
        want = vjp((dw, du))
    else:
        _, vjp = jax.vjp(lambda k, v, beta: xla(k, v, beta, None), k, v, beta)
        want = vjp((dw, du)) + (None,)
    got = jax.jit(lambda *a: wy.wy_factors_vjp_pallas(*a, chunk, interpret=True, method=method))(
        k, v, beta, gc, dw, du)
    for name, g_, w_ in zip(("dk", "dv", "dbeta", "dgc"), got, want):
        if w_ is None:
            assert g_ is None, name
            continue
        assert g_.shape == w_.shape and g_.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(g_))), name
        assert _rel(g_, w_) < 1e-4, (name, _rel(g_, w_))


@pytest.mark.parametrize("chunk,gated", [(64, True), (8, False)])
def test_product_form_inverse_matches_triangular_solve(chunk, gated):
    b, h, dk, dv = 1, 1, 16, 16
    k, v, beta, gc, _, _ = _chunk_inputs(40 + chunk, b, 2 * chunk, h, dk, dv, chunk, gated, correlated=True)
    w_ref, u_ref = wy_factors(k, v, beta, gc, chunk)
    w, u = jax.jit(lambda *a: wy.wy_factors_pallas(*a, chunk, interpret=True, method="product"))(k, v, beta, gc)
    assert _rel(w, w_ref) < 1e-5, _rel(w, w_ref)
    assert _rel(u, u_ref) < 1e-5, _rel(u, u_ref)


def test_padding_rows_with_zero_beta_get_finite_gradients_and_zero_dv():
    """The custom VJP pads T with beta = 0, g = 0: those rows write nothing, so d v there must be exactly 0."""
    chunk, b, h, dk, dv = 16, 1, 1, 16, 16
    k, v, beta, gc, dw, du = _chunk_inputs(7, b, chunk, h, dk, dv, chunk, True, correlated=False)
    beta = beta.at[:, 10:].set(0.0)
    got = jax.jit(lambda *a: wy.wy_factors_vjp_pallas(*a, chunk, interpret=True))(k, v, beta, gc, dw, du)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in got)
    np.testing.assert_array_equal(np.asarray(got[1][:, 10:]), 0.0)


def test_bad_inputs_are_named():
    k, v, beta, gc, dw, du = _chunk_inputs(3, 1, 16, 1, 16, 16, 16, True, correlated=False)
    with pytest.raises(ValueError, match="dw/du"):
        wy.wy_factors_vjp_pallas(k, v, beta, gc, dw[:, :8], du, 16, interpret=True)
    with pytest.raises(ValueError, match="inverse method"):
        wy.wy_factors_pallas(k, v, beta, gc, 16, interpret=True, method="newton")
    with pytest.raises(ValueError, match="multiple of chunk"):
        wy.wy_factors_pallas(k, v, beta, gc, 32, interpret=True)


# (chunk, gated, inverse, correlation of the keys): chunk 64 is the GPU case; correlation 10 (keys nearly parallel,
# the plain rule's worst case) makes the inverse's alternating sums large. Chunks below the product-form base:
# test_unit_lower_inverse_matches_triangular_solve (c = 12) and the kernel VJP tests (chunk 8, 16).
EXPLICIT_CASES = [(64, True, "blocked", 2.0), (64, False, "blocked", 10.0), (32, False, "solve", 2.0)]


@pytest.mark.parametrize("chunk,gated,inverse,corr", EXPLICIT_CASES)
def test_explicit_xla_vjp_matches_jax_vjp_of_xla_preparation(chunk, gated, inverse, corr):
    """common.wy_factors_and_vjp (T formed once, matmul-only VJP) against jax.vjp through the triangular solve."""
    b, h, dk, dv = 1, 2, 16, 32
    t = 2 * chunk
    k, v, beta, gc, dw, du = _chunk_inputs(60 + chunk + gated, b, t, h, dk, dv, chunk, gated, correlated=False)
    k = k + corr * k[:, :1]
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    args = (k, v, beta) + ((gc,) if gated else ())
    (w_ref, u_ref), vjp = jax.vjp(lambda *a: wy_factors(*a[:3], a[3] if gated else None, chunk), *args)
    want = vjp((dw, du)) + (() if gated else (None,))
    def explicit(k, v, beta, gc, dw, du):
        w, u, vjp_fn = wy_factors_and_vjp(k, v, beta, gc, chunk, inverse)
        return w, u, vjp_fn(dw, du)

    w, u, got = jax.jit(explicit)(k, v, beta, gc, dw, du)
    assert w.dtype == k.dtype and _rel(w, w_ref) < 1e-5 and _rel(u, u_ref) < 1e-5, (_rel(w, w_ref), _rel(u, u_ref))
    for name, g_, w_ in zip(("dk", "dv", "dbeta", "dgc"), got, want):
        if w_ is None:
            assert g_ is None, name
            continue
        assert g_.shape == w_.shape and g_.dtype == jnp.float32, name
        assert _rel(g_, w_) < 2e-5, (name, _rel(g_, w_))


@pytest.mark.parametrize("c,base", [(64, 16), (48, 16), (12, 16), (64, 4)])
def test_unit_lower_inverse_matches_triangular_solve(c, base):
    a = jnp.tril(jax.random.uniform(jax.random.PRNGKey(c + base), (3, c, c), minval=-0.5, maxval=0.5), k=-1)
    eye = jnp.broadcast_to(jnp.eye(c), a.shape)
    want = jax.lax.linalg.triangular_solve(a + eye, eye, left_side=True, lower=True, unit_diagonal=True)
    got = unit_lower_inverse(a, base)
    assert _rel(got, want) < 1e-5, _rel(got, want)
    assert _rel(got @ (a + eye), eye) < 1e-5  # a true inverse, not just agreeing with the solve


def test_explicit_vjp_rejects_unknown_inverse():
    k, v, beta, gc, _, _ = _chunk_inputs(3, 1, 16, 1, 16, 16, 16, True, correlated=False)
    with pytest.raises(ValueError, match="inverse"):
        wy_factors_and_vjp(k, v, beta, gc, 16, inverse="newton")


@pytest.mark.parametrize("per_program,n_chunks", [(2, 4), (4, 4), (2, 3)])
def test_several_chunks_per_program_give_the_same_factors(per_program, n_chunks, monkeypatch):
    """WY_CHUNKS_PER_PROGRAM unrolls consecutive chunks in one program (falls back to 1 when it does not divide)."""
    chunk = 16
    k, v, beta, gc, _, _ = _chunk_inputs(3, 1, chunk * n_chunks, 2, 16, 32, chunk, True, correlated=True)
    q = jax.random.normal(jax.random.PRNGKey(9), k.shape)

    def run():
        return jax.jit(lambda q, k, v, beta, gc: wy.wy_factors_pallas(k, v, beta, gc, chunk, interpret=True, q=q))(
            q, k, v, beta, gc)

    want = run()
    monkeypatch.setattr(wy, "WY_CHUNKS_PER_PROGRAM", per_program)
    for g_, w_ in zip(run(), want):
        np.testing.assert_array_equal(np.asarray(g_), np.asarray(w_))


@pytest.mark.parametrize("sub", [32, 64])
def test_larger_diagonal_blocks_match_the_triangular_solve(sub, monkeypatch):
    """WY_SUB 32 / 64 (knobs, not the default: on the GPU they lose precision on correlated ungated keys): the
    product-form inverse on bigger blocks, correlated gated keys, float32 on CPU."""
    chunk = 64
    k, v, beta, gc, _, _ = _chunk_inputs(5, 1, 2 * chunk, 2, 32, 16, chunk, True, correlated=True)
    w_ref, u_ref = wy_factors(k, v, beta, gc, chunk)
    monkeypatch.setattr(wy, "WY_SUB", sub)
    w, u = jax.jit(lambda k, v, beta, gc: wy.wy_factors_pallas(k, v, beta, gc, chunk, interpret=True,
                                                              method="product"))(k, v, beta, gc)
    assert _rel(w, w_ref) < 1e-5 and _rel(u, u_ref) < 1e-5, (_rel(w, w_ref), _rel(u, u_ref))
