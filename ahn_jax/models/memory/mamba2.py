"""AHN-Mamba2: the SSD memory cell (spec/AHN.md §2.3, init §1.7).

One SSD group per head; the frozen attention's tensors fill the SSD slots:
    x = v [B, n, Hq, P=Dh],  B = L2norm(k),  C = L2norm(q)          (torch F.normalize, eps 1e-12; no 1/sqrt(d) scale)
    dt_raw_j = u_j . w_dt,h + b_dt,h                                 dt_proj [D, Hq] + dt_proj_bias [Hq]; the gate
                                                                     cache holds this raw value
    Delta_j  = softplus(dt_raw_j + dt_bias_h),  a_h = -exp(A_log_h)   (inside the op: dt_bias, dt_softplus=True)
    M_j = exp(Delta_j a_h) M_{j-1} + Delta_j v_j k^_j^T,  o_t = M_j q^_t     M [P, N] per head, float32
Output (norm_before_gate=False: the gate is applied BEFORE the norm, one norm group over all Hq*Dh dims):
    z_t = u_t . w_g,h + b_g,h (one scalar per head)                  g_proj [D, Hq] + g_proj_bias [Hq]
    y~_t = RMSNorm_{Hq*Dh}(o_t * silu(z_t)) * norm                   eps 1e-5, float32, norm [Hq*Dh]
    y_t,h = y~_t,h @ o_proj[h]                                       o_proj [Hq, Dh, Dh] ([in, out]), zero at init
No D skip and no z inside the op. The recurrence lives in ahn_jax/ops/ssd.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ahn_jax.models.memory.base import (
    Memory, MemoryParam, check_hidden, check_qkv, compute_dtype, first_step, group_linear, l2_normalize,
    normal_param, project, rms_normalize)


def _ssd_ops():
    from ahn_jax.ops import mamba_ssd as ssd

    return ssd


class Mamba2Memory(Memory):
    """AHN-Mamba2. Parameters (MemoryParam, float32): dt_proj [D, Hq], dt_proj_bias [Hq], g_proj [D, Hq],
    g_proj_bias [Hq], dt_bias [Hq], A_log [Hq], norm [Hq*Dh], o_proj [Hq, Dh, Dh].
    Gates: {"dt": [B, n, Hq]} (raw dt_proj output). State: [B, Hq, P=Dh, N=Dh] float32."""

    kind = "mamba2"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 128, *, chunk_size: int = 256,
                 impl: str = "auto", dtype=None, norm_eps: float = 1e-5, rngs: nnx.Rngs):
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.chunk_size, self.impl, self.dtype, self.norm_eps = chunk_size, impl, dtype, norm_eps
        h = num_heads
        self.dt_proj = normal_param(rngs, (hidden_size, h))
        self.dt_proj_bias = MemoryParam(jnp.zeros((h,), jnp.float32))
        self.g_proj = normal_param(rngs, (hidden_size, h))
        self.g_proj_bias = MemoryParam(jnp.zeros((h,), jnp.float32))
        # The reference leaves dt_bias at ones (its inverse-softplus init is never applied) and A = -(h+1).
        self.dt_bias = MemoryParam(jnp.ones((h,), jnp.float32))
        self.A_log = MemoryParam(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)))
        self.norm = MemoryParam(jnp.ones((h * head_dim,), jnp.float32))
        self.o_proj = MemoryParam(jnp.zeros((h, head_dim, head_dim), jnp.float32))

    def write_gates(self, u_written):
        """u_written [B, n, D] -> {"dt": [B, n, Hq]} float32 (before dt_bias and softplus, which the op applies)."""
        if u_written.ndim != 3 or u_written.shape[-1] != self.hidden_size:
            raise ValueError(f"Mamba2Memory.write_gates: u_written must be [B, n, {self.hidden_size}]; "
                             f"got {u_written.shape}")
        dtype = compute_dtype(self.dtype, u_written)
        return {"dt": project(u_written, self.dt_proj[...], self.dt_proj_bias[...], dtype=dtype)}

    def _ssd_inputs(self, q, k, v, dtype):
        return v.astype(dtype), l2_normalize(k).astype(dtype), l2_normalize(q).astype(dtype), -jnp.exp(self.A_log[...])

    def read_out(self, o, u_read, dtype):
        """o [B, n, Hq, Dh], u_read [B, n, D] -> y [B, n, Hq*Dh] in `dtype`."""
        z = project(u_read, self.g_proj[...], self.g_proj_bias[...], dtype=dtype)  # [B, n, Hq] float32
        gated = o.astype(jnp.float32) * jax.nn.silu(z)[..., None]
        flat = gated.reshape(*gated.shape[:-2], self.num_heads * self.head_dim)
        normed = (rms_normalize(flat, self.norm_eps) * self.norm[...]).reshape(gated.shape)
        y = group_linear(normed, self.o_proj[...], dtype=dtype)
        return y.reshape(flat.shape)

    def __call__(self, q, k, v, gates, u_read, *, initial_state=None, output_final_state=False):
        """Parallel form. q, k, v [B, n, Hq, Dh]; gates {"dt": [B, n, Hq]}; u_read [B, n, D]
        -> (y [B, n, Hq*Dh], state [B, Hq, Dh, Dh] float32 or None)."""
        check_qkv("Mamba2Memory", q, k, v, self.num_heads, self.head_dim, step=False)
        check_hidden("Mamba2Memory", "u_read", u_read, self.hidden_size, q.shape[:2])
        dtype = compute_dtype(self.dtype, q)
        x, b, c, a = self._ssd_inputs(q, k, v, dtype)
        result = _ssd_ops().ssd(x, gates["dt"], a, b, c, chunk_size=self.chunk_size, dt_bias=self.dt_bias[...],
                                dt_softplus=True, initial_states=initial_state,
                                return_final_states=output_final_state, impl=self.impl)
        o, state = result if output_final_state else (result, None)
        return self.read_out(o, u_read, dtype), state

    def step(self, q_t, k_t, v_t, gates_t, u_read_t, state):
        """One decode step. q_t, k_t, v_t [B, Hq, Dh]; gates_t {"dt": [B, Hq]}; u_read_t [B, D]
        -> (y_t [B, Hq*Dh], state)."""
        check_qkv("Mamba2Memory", q_t, k_t, v_t, self.num_heads, self.head_dim, step=True)
        check_hidden("Mamba2Memory", "u_read_t", u_read_t, self.hidden_size, q_t.shape[:1])
        dtype = compute_dtype(self.dtype, q_t)
        x, b, c, a = self._ssd_inputs(q_t, k_t, v_t, dtype)
        o_t, state = _ssd_ops().ssd_step(x, gates_t["dt"], a, b, c, state, dt_bias=self.dt_bias[...],
                                         dt_softplus=True)
        y = self.read_out(first_step(o_t), first_step(u_read_t), dtype)
        return y[:, 0], state

    def init_state(self, batch: int):
        """Zero SSD state [batch, Hq, P=Dh, N=Dh] float32."""
        return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
