"""Our safetensors reader/writer agree with the `safetensors` package, handle bf16 and shards, and write atomically."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from ahn_jax.hf.safetensors_io import SafetensorsError, list_tensors, read_tensor, write_safetensors


def _random_tensors(rng):
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.i64": rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
        "d.u8": rng.integers(0, 255, (4,)).astype(np.uint8),
        "e.scalar": np.asarray(rng.standard_normal(), np.float64),
    }


def test_matches_safetensors_package_both_ways(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = _random_tensors(rng)
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, tensors, metadata={"format": "np"})
    loaded = load_file(str(ours))
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs))
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
        np.testing.assert_array_equal(read_tensor(theirs, name), value)
        assert list_tensors(theirs)[name] == (value.shape, value.dtype)


def test_bfloat16_round_trip_and_torch_agreement(tmp_path):
    import torch
    from safetensors.torch import load_file

    value = np.random.default_rng(1).standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, {"w": value})
    np.testing.assert_array_equal(read_tensor(path, "w"), value)
    as_torch = load_file(str(path))["w"]
    assert as_torch.dtype == torch.bfloat16
    np.testing.assert_array_equal(as_torch.float().numpy(), value.astype(np.float32))


def test_sharded_index(tmp_path):
    rng = np.random.default_rng(2)
    tensors = _random_tensors(rng)
    names = sorted(tensors)
    write_safetensors(tmp_path / "s1.safetensors", {n: tensors[n] for n in names[:2]})
    write_safetensors(tmp_path / "s2.safetensors", {n: tensors[n] for n in names[2:]})
    weight_map = {n: ("s1.safetensors" if i < 2 else "s2.safetensors") for i, n in enumerate(names)}
    json.dump({"weight_map": weight_map}, open(tmp_path / "model.safetensors.index.json", "w"))
    assert set(list_tensors(tmp_path)) == set(names)
    for n in names:
        np.testing.assert_array_equal(read_tensor(tmp_path, n), tensors[n])
    with pytest.raises(KeyError, match="nope"):
        read_tensor(tmp_path, "nope")


def test_failed_write_leaves_no_file(tmp_path):
    class Exploding:
        shape, dtype = (2,), np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(tmp_path / "x.safetensors", {"a": np.ones(2, np.float32), "b": Exploding()})
    assert os.listdir(tmp_path) == []


def test_offsets_outside_file_are_corrupt(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # 8 of the 16 bytes
    with pytest.raises(SafetensorsError, match="bad.safetensors: corrupt.*'w'"):
        list_tensors(path)
