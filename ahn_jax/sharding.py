"""Device mesh and logical axis rules, defined once.

Mesh axes: ("data", "fsdp", "tensor"). Logical axes name what a tensor dimension means; the rules map them to mesh
axes: batch -> (data, fsdp); embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; everything else replicated.
Parameters get logical axes from their role (ahn_jax.models assigns them by name via `param_logical_axes`).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ahn_jax import compat

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None):
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one of the sizes may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into fsdp*tensor={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return compat.make_mesh(sizes, MESH_AXES, devices=devices)


def logical_to_spec(axes, mesh=None) -> P:
    """PartitionSpec for a tuple of logical axis names (None = replicated). Mesh axes of size 1 are dropped, and a
    mesh axis is used at most once per spec."""
    used, out = set(), []
    for name in axes:
        target = LOGICAL_RULES.get(name) if name else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out)


def divisible_spec(spec: P, shape, mesh) -> P:
    """Drop sharding on dimensions the mesh does not divide (e.g. 2 KV heads over tensor=4): replicate instead."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else axes
        n = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axes if dim % n == 0 else None)
    while out and out[-1] is None:  # P('fsdp') not P('fsdp', None): the form XLA hands back, so jit caches match
        out.pop()
    return P(*out)


# Parameter roles by path pattern -> logical axes of the (in, out) kernel or the table.
_PARAM_RULES = (
    (r"embed", ("vocab", "embed")),
    (r"lm_head", ("embed", "vocab")),
    (r"(q_proj|k_proj|v_proj).*(kernel|weight)", ("embed", "heads")),
    (r"o_proj.*(kernel|weight)", ("heads", "embed")),
    (r"(gate_proj|up_proj).*(kernel|weight)", ("embed", "mlp")),
    (r"down_proj.*(kernel|weight)", ("mlp", "embed")),
)


def param_logical_axes(path: str, ndim: int):
    """Logical axes for a parameter from its path; vectors and unknown roles are replicated."""
    if ndim == 2:
        for pattern, axes in _PARAM_RULES:
            if re.search(pattern, path):
                return axes
    return (None,) * ndim


def shard_params(tree, mesh):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) keyed by their paths."""
    def one(path, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        spec = logical_to_spec(param_logical_axes(name, len(x.shape)), mesh)
        return NamedSharding(mesh, divisible_spec(spec, x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh, ndim: int = 2):
    """Sharding of a [B, ...] batch: batch over (data, fsdp)."""
    return NamedSharding(mesh, divisible_spec(logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh),
                                              (mesh.shape["data"] * mesh.shape["fsdp"],) + (1,) * (ndim - 1), mesh))
