"""Compile the Mosaic GPU sliding-window backward once and let ptxas report registers and spills (H100 only).

  MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH=$PWD python3 benchmarks/swa_mgpu_ptxas.py --fused 0 --registers 240 \\
      2>&1 | grep -E "entry function|spill|registers"

MOSAIC_GPU_DUMP_PTXAS makes jaxlib's Mosaic GPU compiler print ptxas's verbose report per kernel (dq_entry,
dkdv_entry). The shapes are small (T 2048): registers and spills do not depend on them.
"""

import argparse

import jax
import jax.numpy as jnp

from pallas_kernels import swa_attention_mgpu as mgpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fused", type=int, default=0, help="1: dq accumulated by the dk/dv kernel (fused_dq)")
    parser.add_argument("--registers", type=int, default=mgpu.BWD_DKV_REGISTERS, choices=(232, 240),
                        help="the dk/dv kernel's compute warpgroups' registers")
    opts = parser.parse_args()
    t = 2048
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    q = jax.random.normal(keys[0], (1, t, 16, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, 2, 128), jnp.bfloat16)
    lse = jnp.zeros((1, 16, t), jnp.float32)
    cfg = mgpu.MgpuBwdConfig(window=1024, sinks=128, scale=0.1, fused_dq=bool(opts.fused),
                             dkv_registers=opts.registers)
    jax.block_until_ready(jax.jit(lambda *a: mgpu.backward(*a, cfg))(q, k, k, q, lse, q, lse))
    print(f"compiled: fused_dq={bool(opts.fused)} dkv_registers={opts.registers}")


if __name__ == "__main__":
    main()
