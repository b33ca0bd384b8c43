"""Safetensors in and out with numpy only (no torch), one tensor at a time.

The format is parsed here directly (8-byte little-endian header length, JSON header, raw little-endian data) so that
bfloat16 works through ml_dtypes and a full-size checkpoint is never read whole: `read_tensor` seeks to one tensor.

A checkpoint location is either a single `.safetensors` file or a directory holding `model.safetensors`, a sharded
checkpoint with `model.safetensors.index.json`, or other `*.safetensors` files. Pickled PyTorch checkpoints
(`.bin`, `.pt`, `.pth`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import tempfile
from typing import Mapping

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger claim means a corrupt file

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file or checkpoint directory is unreadable, corrupt or inconsistent (message names the file)."""


def _pickle_message(path: str) -> str:
    return (f"{path} is a pickled PyTorch checkpoint; ahn_jax only reads safetensors (unpickling can run arbitrary "
            f"code). Convert it once with transformers, in an environment you trust: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)")


def read_header(path: str) -> tuple[dict, int]:
    """Parse one file's header -> ({name: {"dtype", "shape", "data_offsets"}, ...}, byte offset of the data).

    Checks that every tensor's byte range lies inside the file and matches its dtype and shape.
    """
    if path.endswith(_PICKLE_SUFFIXES):
        raise SafetensorsError(_pickle_message(path))
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise SafetensorsError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{path}: corrupt safetensors file (header length {header_len} exceeds the "
                                       f"file size {size})")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors file (header is not valid JSON: {e})") from e
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    data_size = size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: corrupt or unsupported header entry for tensor {name!r}: {info!r}") from e
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != expected:
            raise SafetensorsError(f"{path}: corrupt safetensors file (tensor {name!r} has byte range "
                                   f"[{begin}, {end}) but needs {expected} bytes within {data_size} data bytes; "
                                   f"truncated file?)")
    return header, data_start


def _files_by_tensor(location: str) -> dict[str, str]:
    """{tensor name: file path} for a file or a checkpoint directory."""
    location = os.fspath(location)
    if os.path.isfile(location):
        return {n: location for n in read_header(location)[0] if n != "__metadata__"}
    if not os.path.isdir(location):
        raise FileNotFoundError(f"no safetensors checkpoint at {location}")
    index = os.path.join(location, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: corrupt index (needs a JSON object with 'weight_map'): {e}") from e
        out = {name: os.path.join(location, fname) for name, fname in weight_map.items()}
        for path in sorted(set(out.values())):
            if not os.path.isfile(path):
                raise SafetensorsError(f"{index} names shard {os.path.basename(path)} which does not exist")
        return out
    files = sorted(glob.glob(os.path.join(location, "*.safetensors")))
    if not files:
        pickles = [p for p in sorted(os.listdir(location)) if p.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise SafetensorsError(_pickle_message(os.path.join(location, pickles[0])))
        raise FileNotFoundError(f"{location}: no *.safetensors files and no {INDEX_FILE}")
    out = {}
    for path in files:
        for name in read_header(path)[0]:
            if name == "__metadata__":
                continue
            if name in out:
                raise SafetensorsError(f"tensor {name!r} appears in both {out[name]} and {path}")
            out[name] = path
    return out


class CheckpointReader:
    """Reads tensors one at a time from a safetensors file or checkpoint directory; headers are parsed once."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.file_of = _files_by_tensor(self.location)
        self._headers: dict[str, tuple[dict, int]] = {}

    def _header(self, path: str) -> tuple[dict, int]:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    def _info(self, name: str) -> tuple[str, dict, int]:
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} not found in {self.location}")
        path = self.file_of[name]
        header, data_start = self._header(path)
        if name not in header:
            raise SafetensorsError(f"index maps tensor {name!r} to {path}, but that file does not contain it")
        return path, header[name], data_start

    def list_tensors(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{name: (shape, numpy dtype)} without reading any tensor data."""
        out = {}
        for name in self.file_of:
            _, info, _ = self._info(name)
            out[name] = (tuple(int(d) for d in info["shape"]), DTYPES[info["dtype"]])
        return out

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
        path, info, data_start = self._info(name)
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != end - begin:
                raise SafetensorsError(f"{path}: corrupt safetensors file (tensor {name!r} is truncated)")
        return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(info["shape"])

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first file (HF writes {'format': 'pt'})."""
        first = sorted(set(self.file_of.values()))[0] if self.file_of else None
        return dict(self._header(first)[0].get("__metadata__", {})) if first else {}


def list_tensors(location: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a safetensors file or checkpoint directory (single file or sharded)."""
    return CheckpointReader(location).list_tensors()


def read_tensor(location: str | os.PathLike, name: str) -> np.ndarray:
    """Read one tensor from a safetensors file or checkpoint directory."""
    return CheckpointReader(location).read(name)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to one safetensors file, atomically (temporary file in the same folder, then rename).

    Values may be numpy or jax arrays; each is converted to numpy only while it is written, so a dict of device arrays
    is streamed without a second full host copy.
    """
    path = os.fspath(path)
    shapes = {}
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    for name in names:
        value = tensors[name]
        dtype = np.dtype(value.dtype)
        if dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        shape = tuple(int(d) for d in value.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        shapes[name] = (shape, dtype)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                arr = np.ascontiguousarray(np.asarray(tensors[name]), dtype=shapes[name][1])
                f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
                del arr
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
