"""load_pretrained: an HF Qwen checkpoint directory, or an Orbax directory written by `python -m ahn_jax.convert`.

Loading never holds two copies of the weights in host RAM (DESIGN.md pitfall 6): the model is created abstractly
(nnx.eval_shape, nothing allocated), then each tensor is read, cast to the target dtype, put on the device and dropped
from host memory before the next one is read.

Orbax directory layout (defined here once; convert.py writes it through `save_orbax`):
  config.json             copy of the HF config
  ahn_jax_checkpoint.json {"format": ORBAX_FORMAT, "dtype": ..., "params": "params"}
  params/                 Orbax StandardCheckpointer tree: nested dicts of our parameter paths (layer indices as str)
  tokenizer files         copied as they were
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ahn_jax.models.config import QwenConfig
from ahn_jax.models.qwen import QwenForCausalLM, resolve_dtype

MARKER_FILE = "ahn_jax_checkpoint.json"
ORBAX_FORMAT = "ahn_jax-orbax-v1"
PARAMS_SUBDIR = "params"


def is_orbax_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MARKER_FILE))


def abstract_split(config: QwenConfig, dtype):
    """(graphdef, abstract Param State of ShapeDtypeStructs) for a model with this config; allocates nothing."""
    return nnx.split(QwenForCausalLM(config, dtype=dtype, abstract=True))


def _to_device(path: str, value: np.ndarray, target) -> jax.Array:
    """Cast one numpy tensor to the target leaf's dtype and place it on the default device."""
    return jax.device_put(np.ascontiguousarray(value).astype(target.dtype))


def load_hf(path: str | os.PathLike, *, dtype="bfloat16", progress: Callable[[Iterator], Iterator] = iter):
    """HF directory (config.json + safetensors, sharded or not) -> QwenForCausalLM in `dtype`."""
    from ahn_jax.hf.qwen_names import assign
    from ahn_jax.hf.safetensors_io import CheckpointReader

    path = os.fspath(path)
    config = QwenConfig.from_hf(path)
    reader = CheckpointReader(path)
    graphdef, state = abstract_split(config, resolve_dtype(dtype))
    filled = assign(config, reader.list_tensors(), reader.read, state, _to_device, source=path, progress=progress)
    return nnx.merge(graphdef, filled)


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def save_orbax(model: QwenForCausalLM, out_dir: str | os.PathLike, source_dtype: str | None = None) -> None:
    """Write the model's Params as an Orbax tree into `out_dir` (which must exist) plus the marker file."""
    import orbax.checkpoint as ocp

    from ahn_jax.hf.qwen_names import flat_params

    out_dir = os.path.abspath(os.fspath(out_dir))
    leaves, _ = flat_params(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, PARAMS_SUBDIR), _nested(leaves))
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
        json.dump({"format": ORBAX_FORMAT, "dtype": source_dtype or model.dtype, "params": PARAMS_SUBDIR}, f, indent=2)


def load_orbax(path: str | os.PathLike, *, dtype="bfloat16"):
    """Orbax directory written by convert -> QwenForCausalLM in `dtype` (restored straight into that dtype)."""
    import orbax.checkpoint as ocp

    from ahn_jax.hf.qwen_names import flat_params

    path = os.path.abspath(os.fspath(path))
    with open(os.path.join(path, MARKER_FILE)) as f:
        marker = json.load(f)
    if marker.get("format") != ORBAX_FORMAT:
        raise ValueError(f"{os.path.join(path, MARKER_FILE)}: format {marker.get('format')!r} is not "
                         f"{ORBAX_FORMAT!r}")
    config = QwenConfig.from_hf(path)
    graphdef, state = abstract_split(config, resolve_dtype(dtype))
    leaves, rebuild = flat_params(state)
    # Restore with explicit single-device shardings (pitfall 9: otherwise Orbax uses the saved topology).
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _nested({p: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding) for p, leaf in leaves.items()})
    params_dir = os.path.join(path, marker.get("params", PARAMS_SUBDIR))
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # Orbax raises many types; name the directory and keep the cause
        raise ValueError(f"{params_dir}: cannot restore the Orbax checkpoint against config.json ({e})") from e
    flat = _flatten(restored)
    missing = sorted(set(leaves) - set(flat))
    if missing:
        raise ValueError(f"{params_dir}: missing parameter(s) {missing[:8]}")
    for p, leaf in leaves.items():
        if tuple(flat[p].shape) != tuple(leaf.shape):
            raise ValueError(f"{params_dir}: parameter {p} has shape {flat[p].shape}, expected {leaf.shape}")
    return nnx.merge(graphdef, rebuild({p: jnp.asarray(flat[p], leaf.dtype) for p, leaf in leaves.items()}))


def load_pretrained(path: str | os.PathLike, *, dtype="bfloat16", ahn=None, ahn_weights=None):
    """Load a Qwen2/2.5/3 model from an HF checkpoint directory or an Orbax directory written by convert.

    dtype: parameter dtype of the base model ("bfloat16", "float32", "float16").
    ahn: None -> the plain base model (QwenForCausalLM, the teacher); an AHNConfig -> the hybrid student
        (HybridQwenForCausalLM: window + sinks + a memory per layer; `model(ids, teacher=True)` is the teacher).
    ahn_weights: an AHN-only safetensors file or directory (ours, or a released ByteDance-Seed AHN-* checkpoint,
        whose config.json window values are training seeds and are ignored); without it the memory starts from its
        initialisation (zero output projection: the student equals the window + sinks model).
    `model(input_ids [B, T])` gives logits [B, T, V] float32.
    """
    if ahn_weights is not None and ahn is None:
        raise ValueError("load_pretrained: ahn_weights needs ahn=AHNConfig(memory=..., window=..., sinks=...) to say "
                         "which memory the file holds and which window to run it with")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_pretrained: {path} is not a directory (expected an HF checkpoint directory or "
                                f"an Orbax directory written by `python -m ahn_jax.convert`)")
    base = load_orbax(path, dtype=dtype) if is_orbax_dir(path) else load_hf(path, dtype=dtype)
    if ahn is None:
        return base
    from ahn_jax.models.hybrid import HybridQwenForCausalLM

    model = HybridQwenForCausalLM(base, ahn)
    if ahn_weights is not None:
        from ahn_jax.hf.ahn_names import import_ahn_weights

        import_ahn_weights(ahn_weights, model.memories_by_layer())
    return model
