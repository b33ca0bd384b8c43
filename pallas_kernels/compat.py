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


def mosaic_gpu_kernel_with_aliases(body, out_type, *, input_output_aliases, grid, grid_names, num_threads,
                                   thread_name, compiler_params, interpret):
    """plgpu.kernel with input_output_aliases ({input index: output index}): an output that starts as the given
    input (a zeroed accumulator that TMA reduce-adds into). Public plgpu.kernel has no such argument in jax 0.10 or
    0.11 (Refs passed to it fail in the GPU interpreter), so this goes through the private mpmd map it wraps; `body`
    allocates its own scratch (run_scoped), as the kernels here do."""
    from jax._src import config
    from jax._src.pallas import mpmd
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=num_threads, thread_name=thread_name)
    with config._check_vma(False):  # as plgpu.kernel does
        return mpmd._mpmd_map([(mesh, body)], out_type, input_output_aliases=input_output_aliases,
                              compiler_params=compiler_params, interpret=interpret)
