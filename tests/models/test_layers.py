"""Layers against plain references: RMSNorm (numpy and HF), RoPE and YaRN frequencies (transformers), attention
(explicit softmax with repeated KV heads, forward and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ahn_jax.models.attention import QwenAttention, default_positions
from ahn_jax.models.config import QwenConfig, YarnScaling
from ahn_jax.models.layers import Linear, RMSNorm, RotaryEmbedding, rope_inv_freq


def test_rmsnorm_matches_numpy_and_hf_cast_order():
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32) * 3
    w = (1 + 0.3 * rng.standard_normal(16)).astype(np.float32)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight[...] = jnp.asarray(w)
    ref = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)

    hf = Qwen2RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.tensor(w))
    norm_bf16 = RMSNorm(16, eps=1e-6, dtype=jnp.bfloat16)
    norm_bf16.weight[...] = jnp.asarray(w, jnp.bfloat16)
    ours = norm_bf16(jnp.asarray(x, jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    with torch.no_grad():
        theirs = hf(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(np.asarray(ours, np.float32), theirs)


@pytest.mark.parametrize("yarn", [None, YarnScaling(factor=4.0, original_max_position_embeddings=256),
                                  YarnScaling(factor=8.0, original_max_position_embeddings=512, beta_fast=16.0,
                                              mscale=1.0, mscale_all_dim=0.5)])
def test_rope_frequencies_match_transformers(yarn):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = 64, 1e6
    params = {"rope_type": "default", "rope_theta": theta}
    if yarn is not None:
        params = {"rope_type": "yarn", "rope_theta": theta, "factor": yarn.factor, "beta_fast": yarn.beta_fast,
                  "original_max_position_embeddings": yarn.original_max_position_embeddings}
        if yarn.mscale:
            params.update(mscale=yarn.mscale, mscale_all_dim=yarn.mscale_all_dim)
    cfg = transformers.Qwen3Config(hidden_size=128, num_attention_heads=2, head_dim=head_dim,
                                   max_position_embeddings=4096, rope_parameters=params)
    if yarn is None:
        ref_inv, ref_scale = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    inv, scale = rope_inv_freq(head_dim, theta, yarn)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale or 1.0)


def test_rope_is_rotate_half_like_hf():
    import torch
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 600, 2, 32)).astype(np.float32)
    rope = RotaryEmbedding(32, 10000.0)
    positions = default_positions(1, 600)
    cos, sin = rope.cos_sin(positions)
    ref, _ = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(q).transpose(1, 2),
                                  torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(np.asarray(rope(jnp.asarray(q), positions)), ref.transpose(1, 2).numpy(), atol=1e-6)
    # Rotation keeps norms and depends only on relative positions.
    k = rng.standard_normal((1, 600, 2, 32)).astype(np.float32)
    score = lambda off: np.einsum("d,d->", np.asarray(rope(jnp.asarray(q), positions + off))[0, 500, 0],  # noqa
                                  np.asarray(rope(jnp.asarray(k), positions + off))[0, 3, 0])
    assert score(0) == pytest.approx(score(37), rel=1e-4)


def _reference_attention(q, k, v, scale):
    """Explicit causal softmax attention with repeated KV heads, float32."""
    groups = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v.astype(jnp.float32))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attend_matches_reference_forward_and_grad(kv_heads):
    config = QwenConfig(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, vocab_size=64,
                        attention_bias=False, qk_norm=True)
    attn = QwenAttention(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(kv_heads), 3)
    q = jax.random.normal(keys[0], (2, 40, 4, 16))
    k = jax.random.normal(keys[1], (2, 40, kv_heads, 16))
    v = jax.random.normal(keys[2], (2, 40, kv_heads, 16))
    ours = jax.jit(attn.attend)
    ref = jax.jit(lambda *a: _reference_attention(*a, 16 ** -0.5))
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
    w = jax.random.normal(jax.random.key(9), (2, 40, 4, 16))
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_attention_seams_compose_to_call():
    config = QwenConfig(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    attn = QwenAttention(config, dtype=jnp.float32, rngs=nnx.Rngs(1))
    u = jax.random.normal(jax.random.key(0), (1, 12, 32))
    pos = default_positions(1, 12)
    q, k, v = attn.project(u, pos)
    assert q.shape == (1, 12, 4, 8) and k.shape == v.shape == (1, 12, 2, 8)
    np.testing.assert_allclose(attn(u, pos), attn.output(attn.attend(q, k, v)), atol=1e-6)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (1, 1, 1), (2, 1), (3,)])
def test_linear_single_row_path_equals_the_plain_product(lead):
    """A single row goes through a 2-row product (layers.MATVEC_ROWS: keeps XLA's GPU gemm); same values, shapes."""
    lin = Linear(16, 8, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (*lead, 16), jnp.float32)
    want = x @ lin.kernel[...] + lin.bias[...]
    got = jax.jit(lambda x: lin(x))(x)
    assert got.shape == (*lead, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    text = jax.jit(lambda x: lin(x)).lower(x).as_text()
    assert ("pad" in text) == (int(np.prod(lead)) == 1)  # the 2-row form only for a single row
