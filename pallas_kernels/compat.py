"""The kernel layer's version shims: pallas_kernels imports only jax and numpy, so it cannot use ahn_jax/compat.py
(where every other branch on the JAX version lives); the few its Mosaic GPU kernels need are here, and only here.
"""

from __future__ import annotations


def mosaic_gpu_interpret_params():
    """Parameters that make a Mosaic GPU kernel (plgpu.kernel) run in jax's GPU interpreter on CPU. jax 0.10 has no
    public name for them."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def mosaic_gpu_load(ref, layout):
    """plgpu.load of a whole shared-memory ref into registers with `layout`: jax 0.11 takes load(src, *, layout),
    jax 0.10 load(src, idx, *, layout)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:
        return plgpu.load(ref, (), layout=layout)
