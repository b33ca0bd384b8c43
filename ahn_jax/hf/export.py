"""Our Qwen parameters -> a Hugging Face checkpoint directory (safetensors, sharded when large, + config.json).

The output is written into a temporary sibling directory and renamed on success, so a failure leaves nothing behind.
Tensors are converted to numpy one at a time while they are written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from ahn_jax.hf.qwen_names import export_tensors
from ahn_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, write_safetensors
from ahn_jax.models.config import QwenConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


class _LazyArray:
    """Shape/dtype known up front; the data is produced only when numpy asks for it (np.asarray)."""

    def __init__(self, thunk: Callable[[], np.ndarray], shape, dtype):
        self._thunk = thunk
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    def __array__(self, dtype=None, copy=None):
        arr = self._thunk()
        return arr if dtype is None else arr.astype(dtype)


def _leaf_meta(state) -> dict:
    from ahn_jax.hf.qwen_names import flat_params

    leaves, _ = flat_params(state)
    return {p: (tuple(leaf.shape), np.dtype(leaf.dtype)) for p, leaf in leaves.items()}


def hf_tensors(config: QwenConfig, state) -> dict[str, _LazyArray]:
    """{HF name: lazy HF-layout array} for an nnx Param State of a QwenForCausalLM."""
    from ahn_jax.hf.qwen_names import name_map

    meta = _leaf_meta(state)
    rules = name_map(config)
    out = {}
    for name, thunk in export_tensors(config, state):
        shape, dtype = meta[rules[name].path]
        out[name] = _LazyArray(thunk, shape[::-1] if rules[name].transpose else shape, dtype)
    return out


def save_hf_checkpoint(out_dir: str | os.PathLike, config: QwenConfig, tensors: Mapping[str, object], *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_files: Iterable[str] = (),
                       progress: Callable = iter) -> str:
    """Write `tensors` ({HF name: array-like}) + config.json (+ copies of `extra_files`) into out_dir, atomically.

    Refuses to overwrite an existing out_dir. Returns out_dir.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        raise FileExistsError(f"output directory {out_dir} already exists; remove it or pick another")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        shards = _plan_shards(tensors, max_shard_bytes)
        names = [n for shard in shards for n in shard]
        dtypes = {np.dtype(tensors[n].dtype).name for n in names}
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, SINGLE_FILE), tensors, metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(progress(shards)):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, fname), {n: tensors[n] for n in shard}, metadata={"format": "pt"})
                for n in shard:
                    weight_map[n] = fname
                    total += _nbytes(tensors[n])
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf_config = config.to_hf()
        if len(dtypes) == 1:
            hf_config["torch_dtype"] = dtypes.pop()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for path in extra_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        chmod_like_mkdir(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_hf(model: nnx.Module, out_dir: str | os.PathLike, **kwargs) -> str:
    """Write a QwenForCausalLM (its `config` and Params, in their dtype) as an HF checkpoint directory."""
    return save_hf_checkpoint(out_dir, model.config, hf_tensors(model.config, nnx.state(model, nnx.Param)), **kwargs)


def _nbytes(arr) -> int:
    return int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize


def _plan_shards(tensors: Mapping[str, object], max_shard_bytes: int) -> list[list[str]]:
    """Group names (sorted) into shards of at most max_shard_bytes (a larger single tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = _nbytes(tensors[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def chmod_like_mkdir(path: str) -> None:
    """mkdtemp makes a 0700 directory; give the final output the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
