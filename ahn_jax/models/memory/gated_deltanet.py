"""AHN-GDN: the Gated DeltaNet memory cell (spec/AHN.md §2.1, §1.5, init §1.7).

DeltaNet (deltanet.py) plus a per-token, per-head log decay computed from the written token:
    g_j = -exp(A_log_h) * softplus(u_j . w_a,h + dt_bias_h)        a_proj [D, Hq]; float32; g <= 0
    M_j = e^{g_j} (I - beta_j k^_j k^_j^T) M_{j-1} + beta_j k^_j v_j^T
The readout, AHN head and zero-initialised o_proj are DeltaNet's. `D` [Hq] (ones) is never used in the forward; it is
kept because the released checkpoints carry it (and it counts in the published parameter totals).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ahn_jax.models.memory.base import MemoryParam, inverse_softplus, normal_param, project
from ahn_jax.models.memory.deltanet import DeltaNetMemory, _delta_ops


class GatedDeltaNetMemory(DeltaNetMemory):
    """AHN-GDN. Parameters: DeltaNet's + a_proj [D, Hq], A_log [Hq], dt_bias [Hq], D [Hq] (unused).
    Gates: {"beta": [B, n, Hq], "g": [B, n, Hq]} float32. State: [B, Hq, Dh(K), Dh(V)] float32."""

    kind = "gated_deltanet"

    def _init_decay(self, rngs):
        h = self.num_heads
        self.a_proj = normal_param(rngs, (self.hidden_size, h))
        # A ~ U(0, 16) as in the reference; the lower end is kept off 0 so that log(A) is finite.
        a = jax.random.uniform(rngs.params(), (h,), jnp.float32, minval=1e-4, maxval=16.0)
        self.A_log = MemoryParam(jnp.log(a))
        # dt log-uniform in [1e-3, 1e-1], clamped >= 1e-4, stored through the inverse softplus.
        dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32,
                                        minval=math.log(1e-3), maxval=math.log(1e-1)))
        self.dt_bias = MemoryParam(inverse_softplus(jnp.maximum(dt, 1e-4)))
        self.D = MemoryParam(jnp.ones((h,), jnp.float32))

    def _decay_gates(self, u, dtype):
        a = project(u, self.a_proj[...], dtype=dtype)  # float32
        return {"g": -jnp.exp(self.A_log[...]) * jax.nn.softplus(a + self.dt_bias[...])}

    def _run(self, q, k, v, gates, initial_state, output_final_state):
        return _delta_ops().gated_delta_rule(
            q, k, v, gates["g"], gates["beta"], scale=self.head_dim ** -0.5, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm=True, chunk_size=self.chunk_size, impl=self.impl)

    def _run_step(self, q_t, k_t, v_t, gates_t, state):
        return _delta_ops().gated_delta_rule_step(q_t, k_t, v_t, gates_t["g"], gates_t["beta"], state,
                                                  scale=self.head_dim ** -0.5, use_qk_l2norm=True)
