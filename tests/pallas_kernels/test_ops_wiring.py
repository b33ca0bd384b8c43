"""The Pallas kernels are reachable as impl="pallas" of the ops (interpret mode on CPU) and agree with the references;
"auto" on CPU never picks them."""

import jax
import jax.numpy as jnp
import numpy as np

from ahn_jax import ops
from ahn_jax.ops import dispatch
from ahn_jax.ops.gated_delta import delta_rule


def test_attention_pallas_impl_matches_xla():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 40, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 40, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 40, 2, 16)), jnp.float32)
    ref = ops.attention(q, k, v, window=7, sinks=3, impl="xla")
    out = ops.attention(q, k, v, window=7, sinks=3, impl="pallas")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-4, atol=2e-5)
    assert "pallas" not in dispatch.ranked("attention", "cpu")
    assert dispatch.ranked("attention", "gpu")[:2] == ["cudnn", "pallas"]


def test_delta_rule_pallas_impl_matches_recurrent():
    rng = np.random.default_rng(1)
    B, T, H, D = 1, 37, 2, 16
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    g = jax.nn.log_sigmoid(jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32))
    beta = jnp.asarray(rng.uniform(size=(B, T, H)), jnp.float32)
    ref, s_ref = ops.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True, impl="recurrent")
    out, s = ops.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True, impl="pallas",
                                  chunk_size=16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-3, atol=1e-4)
    out2, _ = delta_rule(q, k, v, beta, use_qk_l2norm=True, impl="pallas", chunk_size=16)
    ref2, _ = delta_rule(q, k, v, beta, use_qk_l2norm=True, impl="recurrent")
    np.testing.assert_allclose(np.asarray(out2), np.asarray(ref2), rtol=1e-3, atol=1e-4)
    assert dispatch.ranked("gated_delta_rule", "gpu")[0] == "pallas"
    assert dispatch.ranked("gated_delta_rule", "cpu")[0] == "chunk"
