"""AHNConfig: which memory the hybrid student gets, where, and how it runs; `build_memory` builds one layer's memory.

Window and sinks follow ahn_jax/ops/window.py: a query sees the first `sinks` tokens and the `window` most recent ones;
`window` is the pure window (the released checkpoints' config.json values are training seeds and are never read,
spec/AHN.md §6). The paper's long-context setting is window=32640, sinks=128; LongBench uses window=8064, sinks=128.
"""

from __future__ import annotations

import dataclasses

MEMORIES = ("gated_deltanet", "deltanet", "mamba2", "ttt_mlp")
# Chunk length of the memory op when chunk_size is None (fla's 64 for the delta rules, Mamba2's 256).
DEFAULT_CHUNK = {"gated_deltanet": 64, "deltanet": 64, "mamba2": 256}
TTT_DEFAULT_CHUNK = 2048  # AllMem write chunk, capped at the window (spec/ALLMEM.md §4.2)
DTYPES = (None, "float32", "bfloat16", "float16")
TTT_CHOICES = {
    "ttt_qkv_source": ("own", "attn_pre_rope"),
    "ttt_inner_loss": ("mse", "dot"),
    "ttt_renorm": ("read_raw", "post_write"),
    "ttt_feed": ("all", "evicted"),
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AHNConfig:
    """The memory part of a hybrid model (all fields keyword-only).

    memory: "gated_deltanet" | "deltanet" | "mamba2" (AHN, spec/AHN.md §2) or "ttt_mlp" (AllMem, spec/ALLMEM.md §3).
    window, sinks: attention keeps the first `sinks` tokens and the last `window` tokens; window > 0, sinks >= 0.
    layers: None = every decoder layer gets a memory, else a tuple of layer ids (the others keep plain window
        attention). Ids are checked against the model at build time (`resolve_layers`).
    chunk_size: chunk length of the memory op (None: 64 GDN/DN, 256 Mamba2, min(2048, window) TTT write chunk).
    memory_impl, attention_impl: op implementations ("auto" = fastest on the backend; see ahn_jax.ops.dispatch).
    dtype: compute dtype of the memory (None = the activations' dtype); parameters are float32 masters regardless.
    max_window, max_sinks: static upper bounds when window/sinks are passed as traced scalars (training sampler).
    ttt_*: AllMem switches (spec/ALLMEM.md §10 defaults): qkv source "own" (own projections initialised from the
        attention, Option A) or "attn_pre_rope"; inner loss "mse" | "dot"; renorm "read_raw" | "post_write"; feed
        "all" (every token, apply-then-update) | "evicted" (AHN-style); fast-MLP hidden multiple; eta_base (initial
        per-token learning rate); momentum_init (initial chunk momentum); fw_init_gain (fast-weight init gain).
    """

    memory: str
    window: int
    sinks: int = 0
    layers: tuple | None = None
    chunk_size: int | None = None
    memory_impl: str = "auto"
    attention_impl: str = "auto"
    dtype: str | None = None
    max_window: int | None = None
    max_sinks: int | None = None
    ttt_qkv_source: str = "own"
    ttt_inner_loss: str = "mse"
    ttt_renorm: str = "read_raw"
    ttt_feed: str = "all"
    ttt_hidden_mult: int = 2
    ttt_eta_base: float = 1e-2
    ttt_momentum_init: float = 0.9
    ttt_fw_init_gain: float = 0.5

    def __post_init__(self):
        if self.memory not in MEMORIES:
            raise ValueError(f"AHNConfig.memory={self.memory!r} is unknown; choose one of {MEMORIES}")
        if not _is_int(self.window) or self.window <= 0:
            raise ValueError(f"AHNConfig.window must be an int > 0; got {self.window!r}")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise ValueError(f"AHNConfig.sinks must be an int >= 0; got {self.sinks!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"AHNConfig.layers must be None or a sequence of layer ids; got {self.layers!r}")
            layers = tuple(self.layers)
            if not all(_is_int(i) and i >= 0 for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"AHNConfig.layers must be distinct ints >= 0; got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        for name, lowest in (("chunk_size", 1), ("max_window", 1), ("max_sinks", 0)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < lowest):
                raise ValueError(f"AHNConfig.{name} must be None or an int >= {lowest}; got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"AHNConfig.dtype={self.dtype!r} is not supported; choose one of {DTYPES}")
        for name, choices in TTT_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"AHNConfig.{name}={getattr(self, name)!r}; choose one of {choices}")
        if not _is_int(self.ttt_hidden_mult) or self.ttt_hidden_mult <= 0:
            raise ValueError(f"AHNConfig.ttt_hidden_mult must be an int > 0; got {self.ttt_hidden_mult!r}")
        if not 0 < self.ttt_eta_base or not 0 < self.ttt_momentum_init < 1:
            raise ValueError(f"AHNConfig: ttt_eta_base must be > 0 and ttt_momentum_init in (0, 1); got "
                             f"{self.ttt_eta_base!r}, {self.ttt_momentum_init!r}")
        if self.memory == "ttt_mlp" and self.ttt_feed == "all" and self.memory_chunk_size > self.window:
            # A token t reads memory of positions < C*floor(t/C) and the window covers (t-W, t]: no gap iff C <= W.
            raise ValueError(f"AHNConfig.chunk_size={self.memory_chunk_size} exceeds window={self.window}: with "
                             f"ttt_feed='all' the tokens between the last chunk boundary and the window would be lost")

    @property
    def is_ahn(self) -> bool:
        """True for the AHN cells (memory added before o_proj, evicted tokens only)."""
        return self.memory != "ttt_mlp"

    @property
    def memory_chunk_size(self) -> int:
        """The chunk length the memory op runs with."""
        if self.chunk_size is not None:
            return self.chunk_size
        if self.memory == "ttt_mlp":
            return min(TTT_DEFAULT_CHUNK, self.window)
        return DEFAULT_CHUNK[self.memory]

    def resolve_layers(self, num_layers: int) -> tuple:
        """The decoder layer ids that get a memory, checked against a model with `num_layers` layers."""
        if self.layers is None:
            return tuple(range(num_layers))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"AHNConfig.layers has ids {bad} out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1})")
        return self.layers

    def replace(self, **changes) -> "AHNConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready dict (layers as a list)."""
        out = dataclasses.asdict(self)
        if out["layers"] is not None:
            out["layers"] = list(out["layers"])
        return out

    @classmethod
    def from_dict(cls, data) -> "AHNConfig":
        """Inverse of to_dict; unknown keys are an error (a typo must not be ignored silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AHNConfig.from_dict: unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))


def build_memory(ahn: AHNConfig, model_config, layer_idx: int, *, rngs):
    """The memory module of decoder layer `layer_idx` for a base model with `model_config` (reads hidden_size,
    num_attention_heads, head_dim, rms_norm_eps). The memory has one head per attention query head."""
    del layer_idx  # every memory layer has the same shape; kept so per-layer choices can be added without API change
    kw = dict(chunk_size=ahn.memory_chunk_size, impl=ahn.memory_impl, dtype=ahn.dtype, rngs=rngs)
    dims = (model_config.hidden_size, model_config.num_attention_heads, model_config.head_dim)
    if ahn.memory == "gated_deltanet":
        from ahn_jax.models.memory.gated_deltanet import GatedDeltaNetMemory

        return GatedDeltaNetMemory(*dims, **kw)
    if ahn.memory == "deltanet":
        from ahn_jax.models.memory.deltanet import DeltaNetMemory

        return DeltaNetMemory(*dims, **kw)
    if ahn.memory == "mamba2":
        from ahn_jax.models.memory.mamba2 import Mamba2Memory

        return Mamba2Memory(*dims, **kw)
    from ahn_jax.models.memory.ttt_mlp import TTTMLPMemory

    return TTTMLPMemory(*dims, qkv_source=ahn.ttt_qkv_source, inner_loss=ahn.ttt_inner_loss, renorm=ahn.ttt_renorm,
                        feed=ahn.ttt_feed, hidden_mult=ahn.ttt_hidden_mult, eta_base=ahn.ttt_eta_base,
                        momentum_init=ahn.ttt_momentum_init, fw_init_gain=ahn.ttt_fw_init_gain,
                        qk_norm_eps=getattr(model_config, "rms_norm_eps", 1e-6), **kw)
