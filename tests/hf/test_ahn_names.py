"""AHN-only checkpoints with the released names: 3B layout checked abstractly, bit-exact import -> export round trip
for bf16 and float32 files written here with random tensors, clear errors for wrong names and shapes."""

import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from ahn_jax.hf.ahn_names import NAME_MAP, export_ahn_weights, import_ahn_weights, released_layout
from ahn_jax.hf.safetensors_io import list_tensors, read_tensor, write_safetensors
from ahn_jax.models.hybrid_config import AHNConfig, build_memory

D, HEADS, DH, LAYERS = 24, 2, 8, 3
SMALL = type("Dims", (), dict(hidden_size=D, num_attention_heads=HEADS, head_dim=DH, rms_norm_eps=1e-6))


def memories(kind, layers=(0, 1, 2), dims=SMALL, abstract=False):
    ahn = AHNConfig(memory=kind, window=8)
    build = lambda: {i: build_memory(ahn, dims, i, rngs=nnx.Rngs(i)) for i in layers}  # noqa: E731
    return nnx.eval_shape(build) if abstract else build()


def released_shapes(kind, d, nq, h=128):
    """spec/AHN.md §2.6, per layer, torch layout."""
    return {
        "gated_deltanet": {"b_proj.weight": (nq, d), "a_proj.weight": (nq, d), "A_log": (nq,), "dt_bias": (nq,),
                           "D": (nq,), "g_proj.weight": (nq, d), "o_norm.weight": (h,), "o_proj.weight": (nq, h, h)},
        "deltanet": {"b_proj.weight": (nq, d), "g_proj.weight": (nq, d), "o_norm.weight": (h,),
                     "o_proj.weight": (nq, h, h)},
        "mamba2": {"dt_proj.weight": (nq, d), "dt_proj.bias": (nq,), "g_proj.weight": (nq, d), "g_proj.bias": (nq,),
                   "dt_bias": (nq,), "A_log": (nq,), "norm.weight": (nq * h,), "o_proj.weight": (nq, h, h)},
    }[kind]


def write_released_file(path, kind, dtype, seed=0, layers=range(LAYERS)):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for suffix, shape in released_shapes(kind, D, HEADS, DH).items():
            tensors[f"model.layers.{layer}.ahn.fn.{suffix}"] = rng.normal(size=shape).astype(dtype)
    write_safetensors(path, tensors, metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("kind", sorted(NAME_MAP))
def test_qwen25_3b_layout_matches_release(kind):
    dims = type("Dims", (), dict(hidden_size=2048, num_attention_heads=16, head_dim=128, rms_norm_eps=1e-6))
    layout = released_layout(memories(kind, layers=range(36), dims=dims, abstract=True))
    want = {f"model.layers.{l}.ahn.fn.{s}": shape for l in range(36)
            for s, shape in released_shapes(kind, 2048, 16).items()}
    assert {name: entry[3] for name, entry in layout.items()} == want
    assert len(layout) == 36 * (8 if kind != "deltanet" else 4)


@pytest.mark.parametrize("kind", sorted(NAME_MAP))
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=["bf16", "f32"])
def test_import_export_round_trip_is_bit_exact(tmp_path, kind, dtype):
    src = tmp_path / "release"
    src.mkdir()
    # a released repo ships a training config.json with a seed window; it must be ignored, never read
    (src / "config.json").write_text(json.dumps({"sliding_window": 256, "sliding_window_type": "random"}))
    tensors = write_released_file(src / "model.safetensors", kind, dtype)
    mems = memories(kind)
    import_ahn_weights(src, mems)
    # torch Linear [out, in] became our [in, out]; o_proj kept as [head, in, out]
    w = "b_proj" if kind != "mamba2" else "dt_proj"
    np.testing.assert_array_equal(np.asarray(getattr(mems[1], w)[...]),
                                  np.asarray(tensors[f"model.layers.1.ahn.fn.{w}.weight"], np.float32).T)
    np.testing.assert_array_equal(np.asarray(mems[2].o_proj[...]),
                                  np.asarray(tensors["model.layers.2.ahn.fn.o_proj.weight"], np.float32))
    out = tmp_path / "ours.safetensors"
    export_ahn_weights(out, mems, dtype="bfloat16" if dtype is ml_dtypes.bfloat16 else "float32")
    listed = list_tensors(out)
    assert set(listed) == set(tensors)
    for name, original in tensors.items():
        back = read_tensor(out, name)
        assert back.dtype == original.dtype and back.shape == original.shape, name
        assert back.tobytes() == original.tobytes(), name


def test_wrong_names_and_shapes_give_clear_errors(tmp_path):
    kind = "gated_deltanet"
    good = write_released_file(tmp_path / "good.safetensors", kind, np.float32)
    mems = memories(kind)
    before = {i: np.asarray(m.b_proj[...]) for i, m in mems.items()}

    renamed = dict(good)
    renamed["model.layers.0.ahn.fn.beta_proj.weight"] = renamed.pop("model.layers.0.ahn.fn.b_proj.weight")
    write_safetensors(tmp_path / "renamed.safetensors", renamed)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.ahn.fn.beta_proj.weight'"):
        import_ahn_weights(tmp_path / "renamed.safetensors", mems)

    missing = {k: v for k, v in good.items() if k != "model.layers.2.ahn.fn.dt_bias"}
    write_safetensors(tmp_path / "missing.safetensors", missing)
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.2.ahn.fn.dt_bias'"):
        import_ahn_weights(tmp_path / "missing.safetensors", mems)

    bad_shape = dict(good)
    bad_shape["model.layers.1.ahn.fn.o_proj.weight"] = np.zeros((HEADS, DH, DH + 1), np.float32)
    write_safetensors(tmp_path / "shape.safetensors", bad_shape)
    with pytest.raises(ValueError, match=r"'model.layers.1.ahn.fn.o_proj.weight' has shape \(2, 8, 9\), "
                                         r"expected \(2, 8, 8\)"):
        import_ahn_weights(tmp_path / "shape.safetensors", mems)

    # a file for 3 layers into a model whose memories are on layers 0, 1 only: layer 2's tensors are unexpected
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.2.ahn.fn"):
        import_ahn_weights(tmp_path / "good.safetensors", {0: mems[0], 1: mems[1]})
    # another cell's file: the names do not match
    write_released_file(tmp_path / "dn.safetensors", "deltanet", np.float32)
    with pytest.raises(ValueError, match="missing tensor"):
        import_ahn_weights(tmp_path / "dn.safetensors", mems)
    # nothing was assigned by the failed imports
    for i, m in mems.items():
        np.testing.assert_array_equal(np.asarray(m.b_proj[...]), before[i])
