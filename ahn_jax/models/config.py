"""QwenConfig: the backbone's shape and numerics, built only from a Hugging Face config.json.

Both config.json styles are read: transformers 4 (top-level `rope_theta` + `rope_scaling`) and transformers 5
(`rope_parameters` holding `rope_theta`, `rope_type` and the scaling fields). HF's `use_sliding_window` /
`max_window_layers` / `layer_types` are deliberately ignored: the base model (the teacher) is always full attention and
our sliding window is a different thing (DESIGN.md pitfall 7).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "yarn")

# Fields every config.json must carry; missing ones are an error rather than a silently assumed default.
_REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling parameters (names as in HF `rope_scaling` / `rope_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: derived from factor (and mscale/mscale_all_dim if given)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Qwen2 / Qwen2.5 / Qwen3 decoder configuration.

    `attention_bias` is the q/k/v projection bias (always on for Qwen2/2.5); `o_proj_bias` the output projection bias
    (Qwen3's `attention_bias` switches all four; Qwen2 never has it). `qk_norm` is Qwen3's per-head RMSNorm on q and k
    before RoPE.
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    o_proj_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type={self.model_type!r} is not supported; expected one of "
                             f"{SUPPORTED_MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config.json head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> "QwenConfig":
        """Build from a config.json dict, a path to config.json, or a directory holding one."""
        source = "config.json"
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            source = path
            try:
                with open(path) as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        return _from_dict(dict(config), source)

    def to_hf(self) -> dict:
        """A transformers-loadable config.json dict (transformers 4 style keys, which transformers 5 also reads)."""
        out = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "Qwen3ForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": False,
        }
        if self.rope_scaling is not None:
            ys = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
            out["rope_scaling"] = {"rope_type": "yarn", "type": "yarn", **ys}
        if self.model_type == "qwen3":
            out["attention_bias"] = self.attention_bias
        return out


def _from_dict(d: dict, source: str) -> QwenConfig:
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    model_type = d["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; expected one of "
                         f"{SUPPORTED_MODEL_TYPES}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (Qwen uses 'silu')")
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim")
    if head_dim is None and model_type == "qwen3":
        head_dim = 128  # transformers' Qwen3Config default when config.json omits it (real Qwen3 configs state it)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{source}: no head_dim and hidden_size={hidden} is not a multiple of "
                             f"num_attention_heads={heads}")
        head_dim = hidden // heads
    kv_heads = d.get("num_key_value_heads") or heads
    theta, scaling = _rope(d, source)
    if model_type == "qwen2":
        qkv_bias, o_bias, qk_norm = True, False, False
    else:  # qwen3: one switch for all four projections, per-head q/k norm always
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
        qk_norm = True
    return QwenConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(d["vocab_size"]),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        qk_norm=qk_norm,
    )


def _rope(d: dict, source: str) -> tuple[float, YarnScaling | None]:
    """(rope_theta, yarn or None) from either config style; unsupported types raise naming the field."""
    params = d.get("rope_parameters")
    field = "rope_parameters"
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{source}: rope_parameters must be a dict, got {type(params).__name__}")
    if params and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type rope_parameters {sorted(params)} are not supported")
    scaling = d.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise ValueError(f"{source}: rope_scaling must be a dict or null, got {type(scaling).__name__}")
        # Legacy rope_scaling wins over rope_parameters: its own type decides, whatever the other dict says.
        scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
        params = {**(params or {}), **scaling, "rope_type": scaling_type}
        field = "rope_scaling"
    params = dict(params or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: {field} type {rope_type!r} is not supported; supported: "
                         f"{SUPPORTED_ROPE_TYPES} (none or yarn)")
    if rope_type == "default":
        return float(theta), None
    max_pos = int(d.get("max_position_embeddings", 32768))
    # A top-level original_max_position_embeddings wins over the one inside the dict (transformers does the same).
    original = d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original
    if float(factor) <= 0:
        raise ValueError(f"{source}: {field}.factor={factor} must be positive")
    return float(theta), YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )
