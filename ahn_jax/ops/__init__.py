"""Pure-JAX operators (imports only jax and numpy). Each has a plain reference; Pallas kernels are `impl`s of them,
chosen through ahn_jax.ops.dispatch.

Public functions: attention, cached_attention (window + sinks attention), gated_delta_rule, delta_rule (and their
*_step forms), ssd (Mamba2) and ssd_step, ttt_mlp (AllMem) with ttt_mlp_prefill / ttt_mlp_step. The modules are
ops.attention, ops.gated_delta, ops.mamba_ssd, ops.ttt and ops.window (the window/sink semantics, defined once).
"""

from ahn_jax.ops.attention import attention, cached_attention  # noqa: F401
from ahn_jax.ops.gated_delta import (  # noqa: F401
    delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step)
from ahn_jax.ops.mamba_ssd import ssd, ssd_step  # noqa: F401
from ahn_jax.ops.ttt import ttt_mlp, ttt_mlp_init_pending, ttt_mlp_init_state, ttt_mlp_prefill, ttt_mlp_step  # noqa: F401
