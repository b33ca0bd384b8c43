"""The decode kernels (fused memory step, decode attention) lower through Pallas's Triton path for CUDA on this
CPU-only machine (jax.export with platforms=("cuda",) runs the Pallas -> Triton IR lowering without a GPU): this
catches a kernel body the Triton lowering cannot express before device time is spent on it (the one-kernel memory
form and the attention kernel have since run on an H100). What it cannot check: Triton's compilation to PTX, shared
memory and register pressure, and speed."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels.memory_decode as memory_decode

S = jax.ShapeDtypeStruct
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("gather_in_kernel,block_v", [(True, None), (False, None), (True, 32)])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_delta_decode_lowers_to_triton_for_cuda(monkeypatch, gather_in_kernel, gated, block_v):
    from jax.experimental.pallas import triton as plgpu_triton

    # On CPU triton_params returns None (which would select Mosaic GPU); force the Triton parameters the GPU gets.
    monkeypatch.setattr(memory_decode, "triton_params",
                        lambda w, s: plgpu_triton.CompilerParams(num_warps=w, num_stages=s))
    B, HQ, HKV, D, R, HID = 2, 4, 2, 128, 64, 256
    args = [S((B, HQ, D, D), jnp.float32), S((B, HQ, D), jnp.bfloat16), S((B, HKV, R, D), jnp.bfloat16),
            S((B, HKV, R, D), jnp.bfloat16), S((B, R, HQ), jnp.float32),
            S((B, R, HQ), jnp.float32) if gated else None, S((B,), jnp.int32), S((B,), jnp.bool_),
            S((B, HID), jnp.bfloat16), S((HID, HQ), jnp.float32), S((D,), jnp.float32), S((HQ, D, D), jnp.float32)]

    def step(state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm, o_proj):
        return memory_decode.fused_delta_decode(state, q, ring_k, ring_v, beta, g, slot, evict, u, g_proj, o_norm,
                                                o_proj, scale=D ** -0.5, norm_eps=1e-5,
                                                gather_in_kernel=gather_in_kernel, interpret=False, block_v=block_v)

    exported = export.export(jax.jit(step), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    text = exported.mlir_module()
    kernels = 1 if block_v is None else 2  # the split form: state kernel + head kernel
    assert text.count(TRITON_CALL) == kernels, f"expected {kernels} Triton kernel call(s)"
    assert "fused_delta_decode" in text


@pytest.mark.parametrize("gated", [True, False])
def test_fused_delta_decode_columns_lowers_to_triton_for_cuda(monkeypatch, gated):
    """The column form: one Triton kernel (16-column state slices, the head's partials); the head's end is XLA."""
    from jax.experimental.pallas import triton as plgpu_triton

    monkeypatch.setattr(memory_decode, "triton_params",
                        lambda w, s: plgpu_triton.CompilerParams(num_warps=w, num_stages=s))
    B, HQ, HKV, D, R = 1, 4, 2, 128, 64
    args = [S((B, HQ, D, D), jnp.float32), S((B, HQ, D), jnp.bfloat16), S((B, HKV, R, D), jnp.bfloat16),
            S((B, HKV, R, D), jnp.bfloat16), S((B, R, HQ), jnp.float32),
            S((B, R, HQ), jnp.float32) if gated else None, S((B,), jnp.int32), S((B,), jnp.bool_),
            S((B, 256), jnp.bfloat16), S((256, HQ), jnp.float32), S((D,), jnp.float32), S((HQ, D, D), jnp.float32)]

    def step(*a):
        return memory_decode.fused_delta_decode_columns(*a, scale=D ** -0.5, norm_eps=1e-5, interpret=False)

    exported = export.export(jax.jit(step), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    text = exported.mlir_module()
    assert text.count(TRITON_CALL) == 1 and "fused_delta_decode_columns" in text


@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_decode_attention_lowers_to_triton_for_cuda(monkeypatch, dtype, d):
    """The decode-attention kernel (pallas_kernels/decode_attention.py; timed on an H100 since): the Qwen2.5-3B
    layout (8 query heads per KV head, padded to 16 rows) at the split key_split picks for the dtype."""
    from jax.experimental.pallas import triton as plgpu_triton

    import pallas_kernels.decode_attention as decode_attention

    monkeypatch.setattr(decode_attention, "triton_params",
                        lambda w, s: plgpu_triton.CompilerParams(num_warps=w, num_stages=s))
    B, HKV, G, N = 1, 2, 8, 1024
    args = [S((B, HKV, G, d), dtype), S((B, HKV, N, d), dtype), S((B, HKV, N, d), dtype), S((B, N), jnp.int32),
            S((B, N), jnp.bool_), S((B,), jnp.int32)]

    def partials(q, k, v, k_pos, k_valid, q_pos):
        return decode_attention.decode_attention_partials(q, k, v, k_pos, k_valid, q_pos, window=512, sinks=4,
                                                          scale=d ** -0.5, interpret=False)

    exported = export.export(jax.jit(partials), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    text = exported.mlir_module()
    assert text.count(TRITON_CALL) == 1 and "decode_attention" in text


def test_two_block_decode_attention_lowers_to_one_triton_kernel(monkeypatch):
    """A cache's sink block (128 keys) and ring (1024) in one launch: per-block branches on the split index."""
    from jax.experimental.pallas import triton as plgpu_triton

    import pallas_kernels.decode_attention as decode_attention

    monkeypatch.setattr(decode_attention, "triton_params",
                        lambda w, s: plgpu_triton.CompilerParams(num_warps=w, num_stages=s))
    B, HKV, G, D = 1, 2, 8, 128
    blocks = [(S((B, HKV, n, D), jnp.bfloat16), S((B, HKV, n, D), jnp.bfloat16), S((B, n), jnp.int32),
               S((B, n), jnp.bool_)) for n in (128, 1024)]

    def partials(q, blocks, q_pos):
        return decode_attention.decode_attention_partials_blocks(q, blocks, q_pos, window=512, sinks=128,
                                                                 scale=D ** -0.5, interpret=False)

    exported = export.export(jax.jit(partials), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
        S((B, HKV, G, D), jnp.bfloat16), blocks, S((B,), jnp.int32))
    assert exported.mlir_module().count(TRITON_CALL) == 1
