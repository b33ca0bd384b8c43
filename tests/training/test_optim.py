import jax.numpy as jnp
import numpy as np

from ahn_jax.training import optim


def test_schedule_warms_up_then_decays():
    s = optim.lr_schedule(1e-3, 100, 0.1)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    assert float(s(50)) < 1e-3 and float(s(100)) < 1e-6


def test_weight_decay_only_on_matrices_and_accumulation():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    tx = optim.make_optimizer(params, lr=1.0, steps=10, warmup_ratio=0.0, weight_decay=0.5, clip=0.0)
    state = tx.init(params)
    zeros = {"w": jnp.zeros((3, 3)), "b": jnp.zeros((3,))}
    upd, _ = tx.update(zeros, state, params)
    assert float(jnp.abs(upd["b"]).max()) == 0.0  # no gradient and no decay on the vector
    assert float(jnp.abs(upd["w"]).max()) > 0.0  # decay acts on the matrix
    acc = optim.make_optimizer(params, lr=1.0, steps=10, accumulate=2)
    st = acc.init(params)
    g = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    u1, st = acc.update(g, st, params)
    assert float(jnp.abs(u1["w"]).max()) == 0.0  # first micro-step only accumulates


def test_grad_norm_is_the_global_l2_norm():
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16), "b": [jnp.asarray(rng.normal(size=(5,)))]}
    flat = np.concatenate([np.asarray(tree["a"], np.float64).ravel(), np.asarray(tree["b"][0], np.float64)])
    np.testing.assert_allclose(float(optim.grad_norm(tree)), np.linalg.norm(flat), rtol=1e-6)
    assert float(optim.grad_norm({})) == 0.0
