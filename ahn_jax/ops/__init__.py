"""Pure-JAX operators (imports only jax and numpy). Each has a plain reference; Pallas kernels are `impl`s of them.

Exports are filled in as the ops land: gated_delta_rule, delta_rule, ssd, ttt_mlp, attention.
"""

from ahn_jax.ops.attention import attention, cached_attention  # noqa: E402,F401
# `delta_rule` and `ssd` stay the submodules (models import them as modules); their functions are
# ahn_jax.ops.delta_rule.delta_rule and ahn_jax.ops.ssd.ssd.
from ahn_jax.ops.delta_rule import gated_delta_rule, gated_delta_rule_step, delta_rule_step  # noqa: E402,F401
from ahn_jax.ops.ssd import ssd_step  # noqa: E402,F401
from ahn_jax.ops.ttt import (TTTPending, TTTState, ttt_mlp, ttt_mlp_init_pending, ttt_mlp_init_state,  # noqa: E402,F401
                             ttt_mlp_prefill, ttt_mlp_step)
