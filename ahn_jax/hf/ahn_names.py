"""AHN-only checkpoints under the names ByteDance-Seed released (spec/AHN.md §2.6), in and out.

A released file `ByteDance-Seed/AHN-{GDN,DN,Mamba2}-for-Qwen-2.5-Instruct-*/model.safetensors` holds, per decoder
layer l, tensors `model.layers.{l}.ahn.fn.<suffix>` (bf16 or float32). torch Linear weights are [out, in] and become our
[in, out]; the GroupLinear o_proj is already [head, in, out]. The repository's config.json carries training-time window
values (sliding_window=256, dy_*), so it is never read here: window and sinks come from AHNConfig (spec/AHN.md §6).

    import_ahn_weights(location, memories)          file or directory -> assigns every memory parameter, in place
    export_ahn_weights(path, memories, dtype=...)   our memories -> one safetensors file with the released names
where `memories` maps decoder layer id -> memory module (e.g. dict(zip(model.memory_layers, model.memories))).
Every file tensor must be consumed and every parameter assigned exactly once; otherwise a ValueError names the tensor.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ahn_jax.hf.safetensors_io import list_tensors, read_tensor, write_safetensors
from ahn_jax.models.memory.base import MemoryParam

PREFIX = "model.layers.{layer}.ahn.fn."
# memory kind -> released suffix -> (our attribute, is a torch Linear weight to transpose)
NAME_MAP = {
    "gated_deltanet": {
        "b_proj.weight": ("b_proj", True),
        "a_proj.weight": ("a_proj", True),
        "A_log": ("A_log", False),
        "dt_bias": ("dt_bias", False),
        "D": ("D", False),
        "g_proj.weight": ("g_proj", True),
        "o_norm.weight": ("o_norm", False),
        "o_proj.weight": ("o_proj", False),
    },
    "deltanet": {
        "b_proj.weight": ("b_proj", True),
        "g_proj.weight": ("g_proj", True),
        "o_norm.weight": ("o_norm", False),
        "o_proj.weight": ("o_proj", False),
    },
    "mamba2": {
        "dt_proj.weight": ("dt_proj", True),
        "dt_proj.bias": ("dt_proj_bias", False),
        "g_proj.weight": ("g_proj", True),
        "g_proj.bias": ("g_proj_bias", False),
        "dt_bias": ("dt_bias", False),
        "A_log": ("A_log", False),
        "norm.weight": ("norm", False),
        "o_proj.weight": ("o_proj", False),
    },
}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_READABLE = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def _kind(memories: Mapping[int, object]) -> str:
    kinds = {getattr(m, "kind", type(m).__name__) for m in memories.values()}
    if len(kinds) != 1:
        raise ValueError(f"AHN checkpoint: memories must all be of one kind; got {sorted(kinds)}")
    kind = kinds.pop()
    if kind not in NAME_MAP:
        raise ValueError(f"AHN checkpoint: memory kind {kind!r} has no released names (AHN cells: {sorted(NAME_MAP)})")
    return kind


def _our_params(mem) -> dict:
    return {path[-1]: var for path, var in nnx.to_flat_state(nnx.state(mem, MemoryParam))}


def released_layout(memories: Mapping[int, object]) -> dict:
    """{released name: (layer, our attribute, transpose, released shape)} for these memories (abstract ones work)."""
    kind = _kind(memories)
    out = {}
    for layer, mem in sorted(memories.items()):
        params = _our_params(mem)
        names = NAME_MAP[kind]
        mapped = {attr for attr, _ in names.values()}
        if set(params) != mapped:  # the map must cover every parameter exactly once
            raise ValueError(f"AHN checkpoint: layer {layer} {kind} parameters {sorted(params)} do not match the "
                             f"released names' targets {sorted(mapped)}")
        for suffix, (attr, transpose) in names.items():
            shape = tuple(params[attr].shape)
            out[PREFIX.format(layer=layer) + suffix] = (layer, attr, transpose, shape[::-1] if transpose else shape)
    return out


def import_ahn_weights(location: str | os.PathLike, memories: Mapping[int, object]) -> None:
    """Assign every memory parameter from an AHN-only safetensors file or directory (released names).

    Checks all names and shapes before assigning anything, so a bad file leaves the memories untouched."""
    layout = released_layout(memories)
    found = list_tensors(location)
    unexpected = sorted(set(found) - set(layout))
    missing = sorted(set(layout) - set(found))
    if unexpected:
        raise ValueError(f"{location}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all) for "
                         f"{_kind(memories)} memories on layers {sorted(memories)}")
    if missing:
        raise ValueError(f"{location}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, (_, _, _, shape) in layout.items():
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != shape:
            raise ValueError(f"{location}: tensor {name!r} has shape {tuple(got_shape)}, expected {shape}")
        if np.dtype(got_dtype) not in _READABLE:
            raise ValueError(f"{location}: tensor {name!r} has dtype {got_dtype}; expected float32, bfloat16 or "
                             f"float16")
    values = {}
    for name, (layer, attr, transpose, _) in layout.items():
        array = np.asarray(read_tensor(location, name), np.float32)  # exact for bf16 / f16
        values[(layer, attr)] = array.T if transpose else array
    for (layer, attr), array in values.items():
        getattr(memories[layer], attr)[...] = jnp.asarray(array)


def ahn_tensors(memories: Mapping[int, object], dtype: str = "float32") -> dict:
    """{released name: numpy array in `dtype` ("float32" or "bfloat16")} from our memories."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"AHN export: dtype {dtype!r} is not supported; choose one of {sorted(EXPORT_DTYPES)}")
    out = {}
    for name, (layer, attr, transpose, _) in released_layout(memories).items():
        array = np.asarray(getattr(memories[layer], attr)[...], np.float32)
        out[name] = np.ascontiguousarray(array.T if transpose else array).astype(EXPORT_DTYPES[dtype])
    return out


def export_ahn_weights(path: str | os.PathLike, memories: Mapping[int, object], *, dtype: str = "float32") -> None:
    """Write our memories as one AHN-only safetensors file with the released names (loadable by the PyTorch
    reference); written to a temporary file, then renamed."""
    write_safetensors(path, ahn_tensors(memories, dtype), metadata={"format": "pt"})
