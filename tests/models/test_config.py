"""QwenConfig from both config.json styles, with clear errors naming the field."""

import pytest

from ahn_jax.models.config import QwenConfig

BASE = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def test_qwen2_defaults_and_sliding_window_ignored():
    c = QwenConfig.from_hf({**BASE, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1})
    assert c.head_dim == 16 and c.attention_bias and not c.o_proj_bias and not c.qk_norm and c.kv_groups == 2
    assert c.rope_scaling is None and c.rope_theta == 10000.0


def test_qwen3_fields():
    c = QwenConfig.from_hf({**BASE, "model_type": "qwen3", "head_dim": 24, "attention_bias": False,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert c.head_dim == 24 and c.qk_norm and not c.attention_bias and c.rope_theta == 5e5


@pytest.mark.parametrize("style", ["legacy", "transformers5"])
def test_yarn_both_styles(style):
    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768}
    if style == "legacy":
        d = {**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", **yarn}}
    else:
        d = {**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, **yarn}}
    c = QwenConfig.from_hf(d)
    assert c.rope_theta == 1e6 and c.rope_scaling.factor == 4.0
    assert c.rope_scaling.original_max_position_embeddings == 32768
    assert QwenConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("change,pattern", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0}}, "rope_parameters type 'llama3' is not supported"),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"vocab_size": None}, r"missing required field\(s\) \['vocab_size'\]"),
])
def test_errors_name_the_field(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        QwenConfig.from_hf({**BASE, **change})


def test_from_path_and_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        QwenConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        QwenConfig.from_hf(tmp_path / "nowhere")
