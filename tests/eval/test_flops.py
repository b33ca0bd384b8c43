"""eval.flops reproduces the AHN paper's Table 9 to its printed digits (spec/AHN.md §9) and ALLMEM.md's cache example."""

import pytest

from ahn_jax.eval import flops
from ahn_jax.eval.flops import AllMemShape, ModelShape

# Public Hugging Face config.json values of the Qwen models (only the fields the counts need, plus noise).
QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064)
QWEN25_14B = dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                  intermediate_size=13824, vocab_size=152064)
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936)

L, W = 128_000, 32_768  # Table 9: context length and total lossless tokens (sinks + window)


def gb(x):
    return f"{x / 1e9:.2f}"


def e15(x):
    return f"{x / 1e15:.2f}"


@pytest.mark.parametrize("config,memory,mixing,model", [
    # Table 9 (Full / SWA / AHN): cache GB, mixing FLOPs 1e15, model FLOPs 1e15
    (QWEN25_3B, ("9.44", "2.42", "2.45"), ("2.50", "1.17", "1.17"), ("3.29", "1.95", "1.95")),
    (QWEN25_14B, ("50.33", "12.88", "13.01"), ("8.83", "4.37", "4.38"), ("11.83", "7.38", "7.39")),
])
def test_table9(config, memory, mixing, model):
    shape = ModelShape.from_hf_config(config)
    for variant, mem, mix, mod in zip(("full", "swa", "gated_deltanet"), memory, mixing, model):
        assert gb(flops.cache_bytes(shape, L, variant, window=W)) == mem, variant
        assert e15(flops.mixing_flops(shape, L, variant, window=W)) == mix, variant
        assert e15(flops.model_flops(shape, L, variant, window=W)) == mod, variant
    # the three AHN cells have the same state, so the same cache (Table 9 lists AHN once)
    for memory_kind in ("deltanet", "mamba2"):
        assert gb(flops.cache_bytes(shape, L, memory_kind, window=W)) == memory[2]


def test_table9_7b_memory_and_ratio():
    """7B: cache matches; the absolute mixing FLOPs do not follow from the public config (spec §9), the ratio does."""
    shape = ModelShape.from_hf_config(QWEN25_7B)
    assert [gb(flops.cache_bytes(shape, L, v, window=W)) for v in ("full", "swa", "gated_deltanet")] == \
        ["14.68", "3.76", "3.81"]
    ratio = flops.mixing_flops(shape, L, "swa", window=W) / flops.mixing_flops(shape, L, "full", window=W)
    assert f"{ratio:.3f}" == f"{1.55 / 3.23:.3f}"


def test_sinks_plus_window_is_the_paper_budget():
    shape = ModelShape.from_hf_config(QWEN25_3B)
    for fn in (flops.mixing_flops, flops.cache_bytes):
        assert fn(shape, L, "gated_deltanet", window=W - 128, sinks=128) == fn(shape, L, "gated_deltanet", window=W)


def test_state_macs_one_is_the_papers_table1_formula():
    """Table 1 (spec §9), written out here independently: projections + window + AHN-GDN per layer."""
    c = QWEN25_14B
    D, Nq, Nkv, H = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], 128
    per_layer = (4 * L * D * H * (Nq + Nkv) + 2 * H * Nq * W ** 2
                 + 2 * (L - W) * (2 * W * H * Nq + H * H * Nq + 3 * D * Nq + H * H * Nq))
    shape = ModelShape.from_hf_config(c)
    assert flops.mixing_flops(shape, L, "gated_deltanet", window=W, state_macs=1) == c["num_hidden_layers"] * per_layer
    full = 4 * L * D * H * (Nq + Nkv) + 2 * H * Nq * L ** 2
    assert flops.mixing_flops(shape, L, "full") == c["num_hidden_layers"] * full


def test_short_context_has_no_memory_cost():
    shape = ModelShape.from_hf_config(QWEN25_3B)
    for variant in ("swa", "gated_deltanet", "deltanet", "mamba2"):
        assert flops.mixing_flops(shape, 1000, variant, window=W) == flops.mixing_flops(shape, 1000, "full")
    assert flops.cache_bytes(shape, 1000, "swa", window=W) == flops.cache_bytes(shape, 1000, "full")
    # beyond the budget, the window variants grow linearly, full attention quadratically
    grow = [flops.mixing_flops(shape, n, "gated_deltanet", window=W) for n in (2 * W, 3 * W, 4 * W)]
    assert grow[2] - grow[1] == grow[1] - grow[0]
    assert flops.cache_bytes(shape, 10 * L, "mamba2", window=W) == flops.cache_bytes(shape, L, "mamba2", window=W)


def test_allmem_cache_example_and_flops():
    """ALLMEM.md §5: Qwen3-0.6B at 128k: full KV ~7.5 G values; W=8k + 256 sinks: ~0.48 G KV + ~88 M fast weights."""
    shape = ModelShape.from_hf_config(QWEN3_06B)
    n = 131_072
    assert f"{flops.cache_bytes(shape, n, 'full', bytes_per_element=1) / 1e9:.1f}" == "7.5"
    swa = flops.cache_bytes(shape, n, "swa", window=8192, sinks=256, bytes_per_element=1)
    allmem = flops.cache_bytes(shape, n, "ttt_mlp", window=8192, sinks=256, bytes_per_element=1)
    assert f"{swa / 1e9:.2f}" == "0.48"
    assert f"{(allmem - swa) / 1e6:.0f}" == "88"
    assert f"{allmem / 1e9:.2f}" == "0.57"
    # ~18 * dk * dh FLOPs per token per head (§4.3) plus Option A projections and 4 gate projections, on every token
    hm, dk, dh, D = 16, 128, 256, 1024
    per_token = hm * 18 * dk * dh + 2 * 4 * D * hm * dk + 2 * 4 * D * hm
    extra = (flops.mixing_flops(shape, n, "ttt_mlp", window=8192, sinks=256)
             - flops.mixing_flops(shape, n, "swa", window=8192, sinks=256))
    assert extra == shape.layers * n * per_token
    smaller = AllMemShape(heads=8, key_dim=64, hidden_mult=1)
    assert flops.cache_bytes(shape, n, "ttt_mlp", window=8192, sinks=256, allmem=smaller, bytes_per_element=1) \
        - swa == shape.layers * 2 * 3 * 8 * 64 * 64


def test_cost_table_and_config_errors():
    shape = ModelShape.from_hf_config(QWEN25_3B)
    assert shape.head_dim == 128 and shape.kv_heads == 2
    table = flops.cost_table(shape, L, window=W)
    assert set(table) == set(flops.VARIANTS)
    assert table["gated_deltanet"]["cache_bytes"] == flops.cache_bytes(shape, L, "gated_deltanet", window=W)
    assert ModelShape.from_hf_config(QWEN3_06B).head_dim == 128  # explicit head_dim, != hidden / heads
    bad = dict(QWEN25_3B)
    del bad["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_hf_config(bad)
    with pytest.raises(ValueError, match="needs `window`"):
        flops.mixing_flops(shape, L, "swa")
    with pytest.raises(ValueError, match="unknown variant"):
        flops.cache_bytes(shape, L, "lstm", window=W)
