"""Building blocks of the Qwen decoder: RMSNorm, rotary embedding (rotate-half, default or YaRN), Linear, SwiGLU MLP.

Parameters are plain `nnx.Param`s in the model dtype (float32 in parity tests, bfloat16 otherwise). Matmuls run in the
parameter dtype with float32 accumulation and return the parameter dtype, like a bf16 torch Linear does.
Linear kernels are stored [in, out] (HF stores [out, in]; hf/qwen_names.py transposes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ahn_jax.models.config import YarnScaling


def _normal(rngs: nnx.Rngs | None, shape, dtype, std=0.02):
    """Random init; rngs=None builds an abstract parameter (ShapeDtypeStruct) without tracing anything.

    (nnx.eval_shape over a 14B model spends tens of seconds in tracer bookkeeping; loading only needs the shapes.)
    """
    if rngs is None:
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _ones(shape, dtype, abstract: bool):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) if abstract else jnp.ones(shape, dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis in HF's cast order: float32 normalise, cast to input dtype, then * weight."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, abstract: bool = False):
        self.eps = eps
        self.weight = nnx.Param(_ones((dim,), dtype, abstract))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim] in the promoted dtype of x and weight."""
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


# A single-row product (decode at batch 1) is computed on two rows, the second zero. XLA's GPU pipeline rewrites a
# matrix-vector dot with fewer than 10^7 weights into multiply + reduce over the weight's major axis
# (DotStrengthReduction); on the H100 that made o_proj of Qwen2.5-3B a ~0.3 TB/s reduction, 1 ms of a 7 ms decode
# step. Two rows keep the tensor-core gemm: 36 chained 2048 x 2048 projections 21.1 -> 11.7 us each, 2048 x 11008
# 35.2 -> 27.0 us (benchmarks/bench_matvec.py; benchmarks/RESULTS.md). The weights are read once either way.
MATVEC_ROWS = 2


def _dot_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] with float32 accumulation (see MATVEC_ROWS for a single row)."""
    if math.prod(x.shape[:-1]) != 1 or MATVEC_ROWS <= 1:
        return jnp.dot(x, kernel, preferred_element_type=jnp.float32)
    rows = jnp.pad(x.reshape(1, x.shape[-1]), ((0, MATVEC_ROWS - 1), (0, 0)))
    return jnp.dot(rows, kernel, preferred_element_type=jnp.float32)[:1].reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs | None):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(_normal(rngs, (d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in the kernel dtype (float32 accumulation)."""
        kernel = self.kernel[...]
        y = _dot_rows(x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(kernel.dtype)


class SwiGLU(nnx.Module):
    """Qwen MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs | None):
        self.gate_proj = Linear(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., hidden] -> [..., hidden]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, yarn: YarnScaling | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the cos/sin multiplier (YaRN's attention factor, else 1).

    Computed in float32 like transformers, so that angles at long positions agree to the last bits.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if yarn is None:
        return inv_freq, 1.0

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = yarn.factor
    attention_factor = yarn.attention_factor
    if attention_factor is None:
        if yarn.mscale and yarn.mscale_all_dim:
            attention_factor = mscale(factor, yarn.mscale) / mscale(factor, yarn.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        # Dimension index whose wavelength completes `rotations` turns over the original context.
        return (head_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = np.float32(1) - ramp
    interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


class RotaryEmbedding:
    """Rotate-half RoPE (HF Qwen layout: the two halves of head_dim pair up; q/k are never permuted).

    Holds no parameters (plain Python object, so it is not part of the nnx state).
    """

    def __init__(self, head_dim: int, theta: float, yarn: YarnScaling | None = None):
        inv_freq, self.attention_factor = rope_inv_freq(head_dim, theta, yarn)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # hashable, static under jit

    def _key(self):
        return (self.inv_freq, self.attention_factor)

    def __eq__(self, other):
        return isinstance(other, RotaryEmbedding) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """positions [B, T] int -> cos, sin [B, T, head_dim] float32."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles) * self.attention_factor, jnp.sin(angles) * self.attention_factor

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, H, D], positions [B, T] -> rotated x, same shape and dtype (cos/sin cast to x.dtype like HF)."""
        cos, sin = self.cos_sin(positions)
        cos = cos[:, :, None, :].astype(x.dtype)
        sin = sin[:, :, None, :].astype(x.dtype)
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin
