"""What every memory module shares: the trainable Variable type, the module contract, and small numeric helpers.

Contract (all memories; the hybrid layer does the AHN alignment with ahn_jax/ops/window.py, the modules never see
positions):

    gates = mem.write_gates(u_written)            # u_written [B, n, D] -> pytree of [B, n, ...] float32
        What the decode cache stores per token: computed once, from the prenormed hidden state of the token when it
        enters the window, consumed when it leaves (spec/AHN.md §1.2, §10.1 #17).
    y, state = mem(q, k, v, gates, u_read, *, initial_state=None, output_final_state=False)
        The parallel form over n aligned steps: step i absorbs (k[:, i], v[:, i], gates[:, i]) and is then read by
        (q[:, i], u_read[:, i]). q, k, v [B, n, Hq, Dh] (AHN: the frozen attention's post-RoPE q, GQA-repeated k, v),
        u_read [B, n, D] (the reading token's prenormed hidden state). y [B, n, out_features]; state is None unless
        output_final_state.
    y_t, state = mem.step(q_t, k_t, v_t, gates_t, u_read_t, state)
        One decode step: the same as __call__ with n = 1 and the leading step axis dropped
        (q_t [B, Hq, Dh], gates_t leaves [B, ...], u_read_t [B, D], y_t [B, out_features]).
    state = mem.init_state(batch)                 # zeros of the fixed state shape, float32 leaves

`output_site` tells the hybrid layer where y goes: "pre_o_proj" (AHN: added to the attention output before the frozen
o_proj, width Hq*Dh) or "residual" (AllMem: added to the residual stream next to the attention branch, width D).

Parameters are float32 masters of type MemoryParam; compute runs in `dtype` (None = the dtype of the activations passed
in), gates, norms and recurrent states in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class MemoryParam(nnx.Param):
    """A trainable memory parameter. The optimizer, checkpoints and gradients filter on this type (the frozen base
    model uses plain nnx.Param), e.g. `nnx.state(model, MemoryParam)`."""


class FrozenCopy(nnx.Variable):
    """A non-trainable array a memory keeps for itself (e.g. a copy of the attention's q_norm weight); never filtered
    as MemoryParam, so it is neither trained nor saved with the memory."""


def compute_dtype(dtype, *activations):
    """The dtype memory math runs in: `dtype` if given, else the dtype of the first activation."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return activations[0].dtype


def normal_param(rngs: nnx.Rngs, shape, std: float = 0.02) -> MemoryParam:
    """N(0, std) float32 (HF `_init_weights` for nn.Linear with initializer_range 0.02)."""
    return MemoryParam(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def project(x, weight, bias=None, *, dtype):
    """x [..., in] @ weight [in, out] (+ bias [out]) with operands in `dtype`; the result is float32.
    (No preferred_element_type: the CPU backend has no bf16 x bf16 -> f32 dot; GPU/TPU accumulate bf16 dots in
    float32 anyway.)"""
    y = jnp.einsum("...i,io->...o", x.astype(dtype), weight.astype(dtype)).astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def group_linear(x, weight, *, dtype):
    """Per-head block-diagonal projection (the reference's GroupLinear): out[..., h, :] = x[..., h, :] @ weight[h].
    x [..., H, Din], weight [H, Din, Dout] stored [in, out]; result in `dtype`."""
    return jnp.einsum("...hi,hio->...ho", x.astype(dtype), weight.astype(dtype))


def rms_normalize(x, eps: float):
    """x / sqrt(mean(x^2, -1) + eps) in float32 (no weight)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||, eps) over the last axis in float32 (torch F.normalize, what the Mamba2 cell applies to q and k).
    No sqrt of 0: an all-zero row (the hybrid pads shifted inputs with them) maps to 0 with a zero gradient instead
    of NaN (sqrt'(0)) or the 1/eps = 1e12 slope of x / eps."""
    x = x.astype(jnp.float32)
    sumsq = jnp.sum(x * x, axis=-1, keepdims=True)
    inv = jnp.where(sumsq > 0, jax.lax.rsqrt(jnp.maximum(sumsq, eps * eps)), 0.0)
    return x * inv


def inverse_softplus(y):
    """softplus^-1(y) = y + log(1 - exp(-y)) for y > 0 (float32)."""
    y = jnp.asarray(y, jnp.float32)
    return y + jnp.log(-jnp.expm1(-y))


def check_qkv(name: str, q, k, v, num_heads: int, head_dim: int, *, step: bool):
    """Clear error when the q/k/v handed to a memory do not have the shape it was built for."""
    rank = 3 if step else 4
    layout = "[B, Hq, Dh]" if step else "[B, n, Hq, Dh]"
    for tname, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != rank or t.shape[-2:] != (num_heads, head_dim):
            raise ValueError(f"{name}: {tname} must be {layout} with Hq={num_heads}, Dh={head_dim}; got {t.shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{name}: q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")


def check_hidden(name: str, tname: str, u, hidden_size: int, lead_shape):
    """Clear error when a prenormed hidden-state tensor does not match the steps it should align with."""
    if u.shape != (*lead_shape, hidden_size):
        raise ValueError(f"{name}: {tname} must have shape {(*lead_shape, hidden_size)}; got {u.shape}")


def first_step(tree):
    """Add a length-1 step axis (axis 1) to every leaf: turns step() inputs into a one-step parallel call."""
    return jax.tree.map(lambda a: a[:, None], tree)


def count_params(module) -> int:
    """Number of MemoryParam scalars in `module` (works on abstract modules from nnx.eval_shape)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, MemoryParam))))


class Memory(nnx.Module):
    """Base class: documents the contract above. Subclasses set num_heads, head_dim, hidden_size, dtype and
    output_site, and implement write_gates, __call__, step and init_state."""

    output_site = "pre_o_proj"

    @property
    def out_features(self) -> int:
        return self.num_heads * self.head_dim

    def write_gates(self, u_written):  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, q, k, v, gates, u_read, *, initial_state=None, output_final_state=False):  # pragma: no cover
        raise NotImplementedError

    def step(self, q_t, k_t, v_t, gates_t, u_read_t, state):  # pragma: no cover - interface
        raise NotImplementedError

    def init_state(self, batch: int):  # pragma: no cover - interface
        raise NotImplementedError
