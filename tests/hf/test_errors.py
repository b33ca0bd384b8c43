"""Bad checkpoints give clear errors naming the tensor / field / file, and convert leaves no output behind."""

import json
import os

import numpy as np
import pytest

from ahn_jax import convert, load_pretrained
from ahn_jax.hf.safetensors_io import SafetensorsError, list_tensors, read_tensor, write_safetensors


def _rewrite(path, edit):
    """Rewrite the single-file checkpoint at `path` with edit({name: array}) applied."""
    file = os.path.join(path, "model.safetensors")
    tensors = {n: read_tensor(path, n) for n in list_tensors(path)}
    edit(tensors)
    write_safetensors(file, tensors, metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def _assert_fails_cleanly(path, tmp_path, exc, pattern):
    """load_pretrained raises `exc` matching `pattern`; convert exits 1 and leaves no output (nor temp) directory."""
    with pytest.raises(exc, match=pattern):
        load_pretrained(path, dtype="float32")
    out_parent = tmp_path / "converted"
    out_parent.mkdir()
    assert convert.main(["--hf", path, "--out", str(out_parent / "out"), "--dtype", "float32"]) == 1
    assert os.listdir(out_parent) == []


@pytest.fixture
def qwen2_dir(hf_checkpoint):
    return hf_checkpoint("qwen2_untied_g1")[0]


def test_missing_tensor(qwen2_dir, tmp_path):
    _rewrite(qwen2_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    _assert_fails_cleanly(qwen2_dir, tmp_path, ValueError, r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias")


def test_extra_tensor(qwen2_dir, tmp_path):
    _rewrite(qwen2_dir, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.ones(64, np.float32)}))
    _assert_fails_cleanly(qwen2_dir, tmp_path, ValueError, r"unexpected tensor.*o_proj\.bias")


def test_wrong_shape(qwen2_dir, tmp_path):
    _rewrite(qwen2_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ones((95, 64), np.float32)}))
    _assert_fails_cleanly(qwen2_dir, tmp_path, ValueError, r"mlp\.up_proj\.weight.*shape \(95, 64\).*\(96, 64\)")


def test_config_tied_but_file_has_different_lm_head(qwen2_dir, tmp_path):
    _edit_config(qwen2_dir, tie_word_embeddings=True)
    _assert_fails_cleanly(qwen2_dir, tmp_path, ValueError, r"tie_word_embeddings=true.*lm_head\.weight")


def test_config_untied_but_file_has_no_lm_head(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2_tied_g2")
    _edit_config(path, tie_word_embeddings=False)
    _assert_fails_cleanly(path, tmp_path, ValueError, r"missing tensor.*lm_head\.weight.*tied")


def test_tied_file_with_identical_lm_head_copy_is_consumed(hf_checkpoint):
    # Some releases store the tied table twice; a bit-identical copy is not a disagreement.
    path, _ = hf_checkpoint("qwen2_tied_g2")
    _rewrite(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    model = load_pretrained(path, dtype="float32")
    assert model.lm_head is None


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
])
def test_unsupported_rope_scaling(qwen2_dir, tmp_path, field, value):
    _edit_config(qwen2_dir, **{field: value})
    _assert_fails_cleanly(qwen2_dir, tmp_path, ValueError, rf"{field}.*not supported")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_file(qwen2_dir, tmp_path, damage):
    file = os.path.join(qwen2_dir, "model.safetensors")
    data = open(file, "rb").read()
    data = data[: len(data) - 100] if damage == "truncate" else data[:8] + b"{not json" + data[17:]
    open(file, "wb").write(data)
    _assert_fails_cleanly(qwen2_dir, tmp_path, SafetensorsError, r"model\.safetensors: corrupt")


def test_pickled_bin_checkpoint_is_refused(tmp_path):
    from hf_tiny import make_hf_model

    path = tmp_path / "bin_ckpt"
    make_hf_model("qwen2", num_key_value_heads=2).save_pretrained(str(path), safe_serialization=False)
    bins = [n for n in os.listdir(path) if n.endswith(".bin")]
    if not bins:  # transformers 5 may ignore safe_serialization=False: write the pickle the way torch would
        import torch

        for n in os.listdir(path):
            if n.endswith(".safetensors"):
                os.remove(path / n)
        torch.save({"x": torch.ones(2)}, path / "pytorch_model.bin")
    _assert_fails_cleanly(str(path), tmp_path, SafetensorsError,
                          r"pytorch_model\.bin.*pickled.*safe_serialization=True")


def test_existing_output_dir_is_not_overwritten(qwen2_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert convert.main(["--hf", qwen2_dir, "--out", str(out)]) == 1
    assert os.listdir(out) == ["keep.txt"]
