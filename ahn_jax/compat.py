"""Every branch on the JAX / Flax / Pallas version lives here and nowhere else.

Development runs jax 0.10.2 + flax 0.12.8 on CPU; the GPU machine runs jax 0.11.2 + flax 0.12.10. Code elsewhere calls
the helpers below instead of testing versions itself. The one exception is the kernel layer: pallas_kernels imports
only jax and numpy, so its own few shims (for its Mosaic GPU kernels) are in pallas_kernels/compat.py.
"""

from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def backend() -> str:
    """'cpu', 'gpu' or 'tpu' for the default device."""
    return jax.default_backend()


def make_mesh(axis_shapes, axis_names, devices=None):
    """jax.make_mesh with its axis types passed explicitly (0.11 wants them). Auto axes: XLA's sharding propagation
    (GSPMD) places intermediates, as the training step and the models expect."""
    axis_types = (jax.sharding.AxisType.Auto,) * len(axis_names)
    kwargs = {"axis_types": axis_types}
    if devices is not None:
        kwargs["devices"] = devices
    return jax.make_mesh(tuple(axis_shapes), tuple(axis_names), **kwargs)


def set_mesh(mesh):
    """Context manager putting `mesh` in scope (`with mesh:` is deprecated)."""
    return jax.set_mesh(mesh)


def pallas():
    """The Pallas module, imported lazily (importing it is slow and pulls backend modules)."""
    from jax.experimental import pallas as pl

    return pl


def pallas_triton():
    """Pallas' Triton backend module (deprecated in 0.11, still present); None where it is missing."""
    try:
        from jax.experimental.pallas import triton as plgpu_triton
    except ImportError:  # pragma: no cover - depends on the installed jax
        return None
    return plgpu_triton


def pallas_mosaic_gpu():
    """Pallas' Mosaic GPU backend module; None where it is missing."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:  # pragma: no cover
        return None
    return plgpu


def pallas_tpu():
    """Pallas' TPU backend module; None where it is missing."""
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # pragma: no cover
        return None
    return pltpu


def interpret_default() -> bool:
    """Pallas kernels run in interpret mode where no GPU/TPU lowering exists (the CPU test machine)."""
    return backend() == "cpu"
