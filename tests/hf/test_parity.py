"""Logit parity with transformers on tiny random Qwen2/Qwen3 checkpoints (prompts > 512 tokens: RoPE bugs hide in
short prompts), export back to HF, bf16 loading, sharded and bf16 files."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import VARIANTS, hf_logits, random_ids

from ahn_jax import load_pretrained
from ahn_jax.hf.export import export_hf
from ahn_jax.hf.safetensors_io import list_tensors, read_tensor
from ahn_jax.models.qwen import jit_forward

SEQ = 520


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float32_logits_match_transformers(hf_checkpoint, variant):
    path, hf_model = hf_checkpoint(variant)
    ids = random_ids(1, SEQ, seed=len(variant))
    ref = hf_logits(hf_model, ids)
    model = load_pretrained(path, dtype="float32")
    graphdef, state = nnx.split(model)
    ours = np.asarray(jit_forward(graphdef, state, jnp.asarray(ids)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"{variant}: max abs logit error {err}"
    # The logits must not be trivially flat, or the bound above would say little.
    assert ref.std() > 0.1


def test_eager_equals_jit_and_positions_matter(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3_untied_g2_hd32")
    model = load_pretrained(path, dtype="float32")
    ids = jnp.asarray(random_ids(2, 64, seed=3))
    eager = np.asarray(model(ids))
    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(eager, np.asarray(jit_forward(graphdef, state, ids)), atol=1e-5, rtol=0)
    # RoPE is relative: a uniform shift leaves logits unchanged, stretched distances change them.
    shifted = np.asarray(model(ids, positions=jnp.arange(64)[None].repeat(2, 0) + 100))
    np.testing.assert_allclose(shifted, eager, atol=1e-4, rtol=0)
    stretched = np.asarray(model(ids, positions=jnp.arange(64)[None].repeat(2, 0) * 3))
    assert np.abs(stretched - eager).max() > 1e-3


@pytest.mark.parametrize("variant", ["qwen2_tied_g2", "qwen3_untied_g2_hd32"])
def test_export_reloads_in_transformers_exactly(hf_checkpoint, tmp_path, variant):
    import transformers

    path, hf_model = hf_checkpoint(variant)
    model = load_pretrained(path, dtype="float32")
    out = export_hf(model, tmp_path / "exported")
    original = list_tensors(path)
    assert list_tensors(out).keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(read_tensor(out, name), read_tensor(path, name), err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    reloaded.config._attn_implementation = "eager"
    ids = random_ids(1, SEQ, seed=7)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf_model, ids))
    exported_config = json.load(open(os.path.join(out, "config.json")))
    assert exported_config["tie_word_embeddings"] == hf_model.config.tie_word_embeddings


def _per_token_kl(p_logits, q_logits):
    """KL(p || q) per token, float32 softmax."""
    lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


@pytest.mark.parametrize("variant", ["qwen2_untied_g1", "qwen3_tied_g4_hd24"])
def test_bfloat16_load_is_close_in_kl(hf_checkpoint, variant):
    path, hf_model = hf_checkpoint(variant)
    ids = random_ids(1, SEQ, seed=11)
    ref = hf_logits(hf_model, ids)
    model = load_pretrained(path)  # default dtype: bfloat16
    assert model.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    graphdef, state = nnx.split(model)
    ours = np.asarray(jit_forward(graphdef, state, jnp.asarray(ids)))
    kl = _per_token_kl(ref, ours)
    assert kl.max() <= 1e-2, f"{variant}: max per-token KL {kl.max()}"
    assert np.abs(ours - ref).max() > 1e-4  # it really ran in bf16


def test_sharded_bf16_checkpoint(hf_checkpoint, tmp_path):
    import torch

    _, hf_model = hf_checkpoint("qwen2_untied_g1")
    with torch.no_grad():  # round the weights (not the rotary buffer) to bf16 so both sides see the same values
        for p in hf_model.parameters():
            p.copy_(p.bfloat16().float())
    sharded = tmp_path / "sharded_bf16"
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(str(sharded), max_shard_size="60KB")
    assert os.path.isfile(sharded / "model.safetensors.index.json")
    assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 1
    sd = hf_model.state_dict()
    for name, (shape, dtype) in list_tensors(sharded).items():
        assert dtype.name == "bfloat16" and shape == tuple(sd[name].shape)
        np.testing.assert_array_equal(read_tensor(sharded, name).astype(np.float32), sd[name].float().numpy())
    ids = random_ids(1, 64, seed=5)
    ref = hf_logits(hf_model, ids)  # same bf16-rounded weights, float32 compute
    ours = np.asarray(load_pretrained(str(sharded), dtype="float32")(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4
