import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ahn_jax.training.losses import distill_loss


def _dense_reference(h_t, h_s, head, mask, temperature, valid_vocab):
    lt = np.asarray(h_t, np.float64) @ np.asarray(head, np.float64)
    ls = np.asarray(h_s, np.float64) @ np.asarray(head, np.float64)
    lt, ls = lt[..., :valid_vocab] / temperature, ls[..., :valid_vocab] / temperature
    lpt = lt - np.log(np.exp(lt - lt.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lt.max(-1, keepdims=True)
    lps = ls - np.log(np.exp(ls - ls.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ls.max(-1, keepdims=True)
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1)
    return (kl * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("chunk,temperature,valid_vocab", [(4, 1.0, 40), (7, 2.0, 33), (64, 1.0, 37)])
def test_chunked_kl_matches_dense(chunk, temperature, valid_vocab):
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 19, 8, 40
    h_t, h_s = rng.normal(size=(2, B, T, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    loss, m = distill_loss(jnp.asarray(h_t), jnp.asarray(h_s), jnp.asarray(head), jnp.asarray(mask),
                           temperature=temperature, valid_vocab=valid_vocab, chunk=chunk)
    ref = _dense_reference(h_t, h_s, head, mask, temperature, valid_vocab)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(m["tokens"]) == mask.sum()


def test_kl_is_zero_for_identical_streams_and_gradient_matches_dense():
    rng = np.random.default_rng(1)
    B, T, D, V = 1, 10, 6, 12
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    mask = jnp.ones((B, T))
    loss, _ = distill_loss(h, h, head, mask, chunk=3)
    assert abs(float(loss)) < 1e-6
    h_s = h + 0.1 * jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)

    def dense(hs):
        lpt = jax.nn.log_softmax(h @ head, -1)
        lps = jax.nn.log_softmax(hs @ head, -1)
        return jnp.mean(jnp.sum(jnp.exp(lpt) * (lpt - lps), -1))

    g = jax.grad(lambda hs: distill_loss(h, hs, head, mask, chunk=3)[0])(h_s)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(dense)(h_s)), rtol=1e-4, atol=1e-7)
    # the teacher gets no gradient
    gt = jax.grad(lambda ht: distill_loss(ht, h_s, head, mask, chunk=3)[0])(h)
    assert float(jnp.abs(gt).max()) == 0.0


def test_ce_term_and_errors():
    rng = np.random.default_rng(2)
    B, T, D, V = 1, 5, 4, 9
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    loss, m = distill_loss(h, h, head, jnp.ones((B, T)), labels=labels, ce_weight=1.0)
    ref = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(h @ head, -1)), np.asarray(labels)[..., None], -1))
    np.testing.assert_allclose(float(m["ce"]), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        distill_loss(h, h, head, jnp.ones((B, T)), ce_weight=1.0)
    with pytest.raises(ValueError, match="mask shape"):
        distill_loss(h, h, head, jnp.ones((B, T + 1)))
