"""AHNConfig validation and round trip, build_memory, and the published AHN parameter counts (spec/AHN.md §2.6)."""

import types

import pytest
from flax import nnx

from ahn_jax.models.hybrid_config import AHNConfig, build_memory
from ahn_jax.models.memory.base import count_params

# Qwen2.5-Instruct dims (spec/AHN.md §0) and the README Model Zoo totals (spec/AHN.md §2.6).
QWEN25 = {"3B": (2048, 36, 16), "7B": (3584, 28, 28), "14B": (5120, 48, 40)}
PUBLISHED = {
    "3B": {"gated_deltanet": 12_982_464, "deltanet": 11_801_088, "mamba2": 11_872_512},
    "7B": {"gated_deltanet": 21_280_560, "deltanet": 18_468_352, "mamba2": 18_568_256},
    "14B": {"gated_deltanet": 60_960_384, "deltanet": 51_124_224, "mamba2": 51_371_520},
}


def qwen_dims(size):
    d, layers, heads = QWEN25[size]
    return types.SimpleNamespace(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, head_dim=128,
                                 rms_norm_eps=1e-6)


@pytest.mark.parametrize("size", sorted(QWEN25))
@pytest.mark.parametrize("memory", ["gated_deltanet", "deltanet", "mamba2"])
def test_published_parameter_counts(size, memory):
    cfg = qwen_dims(size)
    ahn = AHNConfig(memory=memory, window=32640, sinks=128)
    layers = ahn.resolve_layers(cfg.num_hidden_layers)
    mems = nnx.eval_shape(lambda: [build_memory(ahn, cfg, i, rngs=nnx.Rngs(0)) for i in layers])
    assert len(mems) == cfg.num_hidden_layers
    assert sum(count_params(m) for m in mems) == PUBLISHED[size][memory]


def test_layers_subset_and_out_of_range():
    ahn = AHNConfig(memory="deltanet", window=16, layers=[5, 0, 2])
    assert ahn.layers == (0, 2, 5)
    assert ahn.resolve_layers(6) == (0, 2, 5)
    with pytest.raises(ValueError, match=r"layers has ids \[5\] out of range for a model with 4 layers"):
        ahn.resolve_layers(4)
    assert AHNConfig(memory="deltanet", window=16).resolve_layers(3) == (0, 1, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory="gdn", window=8), "memory='gdn' is unknown"),
    (dict(memory="mamba2", window=0), "window must be an int > 0"),
    (dict(memory="mamba2", window=8, sinks=-1), "sinks must be an int >= 0"),
    (dict(memory="mamba2", window=8, layers=[1, 1]), "layers must be distinct"),
    (dict(memory="mamba2", window=8, chunk_size=0), "chunk_size must be None or an int >= 1"),
    (dict(memory="mamba2", window=8, max_window=0), "max_window must be None or an int >= 1"),
    (dict(memory="mamba2", window=8, max_sinks=-1), "max_sinks must be None or an int >= 0"),
    (dict(memory="mamba2", window=8, dtype="int8"), "dtype='int8'"),
    (dict(memory="ttt_mlp", window=8, ttt_renorm="pre"), "ttt_renorm='pre'"),
    (dict(memory="ttt_mlp", window=8, chunk_size=16), "chunk_size=16 exceeds window=8"),
])
def test_validation_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AHNConfig(**kwargs)


def test_to_dict_from_dict_round_trip_and_unknown_keys():
    ahn = AHNConfig(memory="ttt_mlp", window=64, sinks=4, layers=(1, 3), chunk_size=32, dtype="bfloat16",
                    ttt_inner_loss="dot", ttt_feed="evicted")
    data = ahn.to_dict()
    assert data["layers"] == [1, 3]
    assert AHNConfig.from_dict(data) == ahn
    with pytest.raises(ValueError, match=r"unknown fields \['windwo'\]"):
        AHNConfig.from_dict({**data, "windwo": 3})


def test_chunk_defaults():
    assert AHNConfig(memory="gated_deltanet", window=8).memory_chunk_size == 64
    assert AHNConfig(memory="mamba2", window=8).memory_chunk_size == 256
    assert AHNConfig(memory="ttt_mlp", window=100).memory_chunk_size == 100
    assert AHNConfig(memory="ttt_mlp", window=8192).memory_chunk_size == 2048
