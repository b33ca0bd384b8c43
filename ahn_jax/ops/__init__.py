"""Pure-JAX operators (imports only jax and numpy). Each has a plain reference; Pallas kernels are `impl`s of them.

Exports are filled in as the ops land: gated_delta_rule, delta_rule, ssd, ttt_mlp, attention.
"""

from ahn_jax.ops.attention import attention, cached_attention  # noqa: E402,F401
from ahn_jax.ops.delta_rule import (  # noqa: E402,F401
    delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step, l2_normalize)
from ahn_jax.ops.ssd import ssd, ssd_step  # noqa: E402,F401
