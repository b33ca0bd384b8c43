"""Full-size Qwen configs instantiate abstractly (nothing allocated) with the published parameter counts.

Published totals (Hugging Face safetensors metadata / model cards):
  Qwen2.5-3B-Instruct   3,085,938,688  (tied)
  Qwen2.5-7B-Instruct   7,615,616,512
  Qwen2.5-14B-Instruct 14,770,033,664
  Qwen3-4B              4,022,468,096  (tied)
  Qwen3-8B              8,190,735,360
  Qwen3-1.7B            model card: 1.7B total, 1.4B non-embedding (tied). Its hub page says 2.03B = 2,031,739,904
                        because the released file also stores a copy of the tied table as lm_head.weight; the model
                        itself has 2,031,739,904 - 151,936 * 2048 = 1,720,574,976 parameters.
"""

import json
import pathlib

import jax
import pytest
from flax import nnx

from ahn_jax.models.config import QwenConfig
from ahn_jax.models.loading import abstract_split
from ahn_jax.models.qwen import count_params

CONFIGS = pathlib.Path(__file__).parent / "configs"
PUBLISHED = {
    "Qwen2.5-3B-Instruct": 3_085_938_688,
    "Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen2.5-14B-Instruct": 14_770_033_664,
    "Qwen3-1.7B": 2_031_739_904 - 151_936 * 2048,
    "Qwen3-4B": 4_022_468_096,
    "Qwen3-8B": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_abstract_instantiation_matches_published_count(name):
    config = QwenConfig.from_hf(CONFIGS / f"{name}.json")
    _, state = abstract_split(config, "bfloat16")
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    total = sum(x.size for x in leaves)
    assert total == PUBLISHED[name]
    if name == "Qwen3-1.7B":
        non_embedding = total - config.vocab_size * config.hidden_size
        assert round(non_embedding / 1e9, 1) == 1.4 and round(total / 1e9, 1) == 1.7


def test_abstract_model_equals_eval_shape_of_real_init():
    # The loader's abstract construction must describe exactly the tree a real init builds.
    config = QwenConfig.from_hf(dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=512))
    from ahn_jax.models.qwen import QwenForCausalLM, abstract_model

    traced = nnx.eval_shape(lambda: QwenForCausalLM(config, dtype="bfloat16", rngs=nnx.Rngs(0)))
    meta = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))  # noqa: E731
    assert meta(traced) == meta(abstract_model(config, "bfloat16"))


def test_count_params_on_abstract_model():
    from ahn_jax.models.qwen import abstract_model

    config = QwenConfig.from_hf(json.load(open(CONFIGS / "Qwen2.5-3B-Instruct.json")))
    model = abstract_model(config, "bfloat16")
    assert count_params(model) == PUBLISHED["Qwen2.5-3B-Instruct"]
    assert model.lm_head is None and config.attention_bias and not config.qk_norm
    assert isinstance(nnx.state(model, nnx.Param), nnx.State)
