"""FLOPs and cache sizes of full attention, sliding window (+ sinks) and each memory, per config and context length.

Counting follows the AHN paper (spec/AHN.md §9, which reproduces its Table 9 exactly): only matmuls count, 2 FLOPs per
multiply-accumulate; softmax, norms, gates' elementwise work and RoPE are ignored. Per layer, for L tokens, hidden D,
head_dim H, Nq query heads and Nkv key/value heads, and a lossless budget Wt = sinks + window (capped at L):
  projections  4*L*D*H*(Nq + Nkv)                       (q, o: Nq heads; k, v: Nkv heads)
  full causal  2*H*Nq*L^2                               (the causal half of QK^T and of AV)
  window       2*H*Nq*Wt^2 + (L - Wt) * 4*Wt*H*Nq       (plain causal up to Wt, then Wt keys per query)
  AHN memory   (L - Wt) * 2*(gate projections + H^2*Nq + state_macs*H^2*Nq)   for the tokens that leave the
               window. Gate projections are 3*D*Nq (GDN: beta, decay, output gate) or 2*D*Nq (DN: beta, output
               gate; Mamba2: dt, output gate); H^2*Nq is the per-head o_proj. `state_macs` counts H^2 MACs per head
               for the recurrent state. Default 0: the paper's Table 9 values follow from counting only the
               memory's matmul parameters (2 FLOPs per parameter per token); its Table 1 formula adds one state
               MAC (state_macs=1), which gives 4.39e15 instead of the printed 4.38e15 for 14B AHN-GDN. A real
               delta-rule step does about 3 (read S k, write the outer product, read S^T q).
  AllMem       L * (Hm * 18*dk*dh + 2*(3*D*Hm*dk + Hm*dk*D) + 2*4*D*Hm) on every token (ALLMEM.md §4.3: about
               18*dk*dh FLOPs per token per head; own projections, Option A; lr/momentum gate projections).
"Model FLOPs" add the MLP 2*L*3*D*I per layer and two vocab matmuls 2*(2*L*D*V) (the paper counts the embedding
like the LM head, §9).

Cache (elements, per layer): full 2*L*H*Nkv; window 2*Wt*H*Nkv; plus the memory state: H^2*Nq for the AHN cells
(GDN/DN state [Nq, H, H]; Mamba2 [Nq, p, n] with p = n = head_dim) and the fast weights plus momentum
2 * 3*Hm*dk*dh for AllMem. AHN's small cached gate values and AllMem's pending chunk buffer are left out, as in the
paper. The paper stores everything at 4 bytes/element and reports GB = 1e9 bytes.
"""

from __future__ import annotations

import dataclasses

VARIANTS = ("full", "swa", "gated_deltanet", "deltanet", "mamba2", "ttt_mlp")
AHN_MEMORIES = ("gated_deltanet", "deltanet", "mamba2")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that the counts need."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelShape":
        """From a Hugging Face config.json dict (Qwen2/2.5/3); head_dim defaults to hidden_size // num_heads."""
        names = dict(hidden="hidden_size", layers="num_hidden_layers", heads="num_attention_heads",
                     intermediate="intermediate_size", vocab="vocab_size")
        missing = [v for v in names.values() if v not in config]
        if missing:
            raise ValueError(f"HF config lacks field(s) {missing} needed for FLOPs counting")
        values = {k: int(config[v]) for k, v in names.items()}
        values["kv_heads"] = int(config.get("num_key_value_heads") or values["heads"])
        values["head_dim"] = int(config.get("head_dim") or values["hidden"] // values["heads"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class AllMemShape:
    """AllMem memory sizes (ALLMEM.md §3.2-3.3, §10 defaults); None means "same as the attention"."""

    heads: int | None = None      # H_m
    key_dim: int | None = None    # d_k (= d_v)
    hidden_mult: int = 2          # d_h = hidden_mult * d_k

    def resolve(self, shape: ModelShape):
        heads = self.heads or shape.heads
        key_dim = self.key_dim or shape.head_dim
        return heads, key_dim, self.hidden_mult * key_dim


def _budget(length: int, variant: str, window, sinks: int) -> int:
    """Tokens attention keeps losslessly (sinks + window, capped at the context); the whole context for 'full'."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if variant == "full":
        return length
    if window is None:
        raise ValueError(f"variant {variant!r} needs `window`")
    if window < 1 or sinks < 0:
        raise ValueError(f"need window >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    return min(length, window + sinks)


def _memory_token_flops(shape: ModelShape, variant: str, allmem: AllMemShape, state_macs: int) -> int:
    """Matmul FLOPs the memory spends per token it handles, per layer."""
    D, H, Nq = shape.hidden, shape.head_dim, shape.heads
    if variant in AHN_MEMORIES:
        gate_projections = 3 if variant == "gated_deltanet" else 2
        return 2 * (gate_projections * D * Nq + (1 + state_macs) * H * H * Nq)
    if variant == "ttt_mlp":
        hm, dk, dh = allmem.resolve(shape)
        return hm * 18 * dk * dh + 2 * (3 * D * hm * dk + hm * dk * D) + 2 * 4 * D * hm
    return 0


def _memory_state_elements(shape: ModelShape, variant: str, allmem: AllMemShape) -> int:
    """Elements of the memory state per layer (per sequence)."""
    if variant in AHN_MEMORIES:
        return shape.head_dim ** 2 * shape.heads
    if variant == "ttt_mlp":
        hm, dk, dh = allmem.resolve(shape)
        return 2 * 3 * hm * dk * dh  # W0, W1, W2 and their momentum
    return 0


def mixing_flops(shape: ModelShape, length: int, variant: str = "full", *, window: int | None = None,
                 sinks: int = 0, allmem: AllMemShape = AllMemShape(), state_macs: int = 0) -> int:
    """Token-mixing FLOPs (attention with its q/k/v/o projections, plus the memory) of all layers for `length` tokens.

    variant: one of VARIANTS; "swa" is sinks + window attention without memory. window/sinks as in ops.attention
    (the pure window and the sink count; the paper's "W" is their sum). state_macs: see the module docstring.
    """
    D, H, Nq, Nkv = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads
    L = int(length)
    wt = _budget(L, variant, window, sinks)
    per_layer = 4 * L * D * H * (Nq + Nkv) + 2 * H * Nq * wt * wt + (L - wt) * 4 * wt * H * Nq
    if variant in AHN_MEMORIES:
        per_layer += (L - wt) * _memory_token_flops(shape, variant, allmem, state_macs)
    elif variant == "ttt_mlp":
        per_layer += L * _memory_token_flops(shape, variant, allmem, state_macs)  # AllMem's memory reads and writes every token
    return shape.layers * per_layer


def model_flops(shape: ModelShape, length: int, variant: str = "full", *, window: int | None = None,
                sinks: int = 0, allmem: AllMemShape = AllMemShape(), state_macs: int = 0) -> int:
    """Forward FLOPs of the whole model: mixing + SwiGLU MLP (3 matmuls) + embedding and LM head (paper §9)."""
    L = int(length)
    mlp = shape.layers * 2 * L * 3 * shape.hidden * shape.intermediate
    vocab = 2 * (2 * L * shape.hidden * shape.vocab)
    mixing = mixing_flops(shape, L, variant, window=window, sinks=sinks, allmem=allmem, state_macs=state_macs)
    return mixing + mlp + vocab


def cache_bytes(shape: ModelShape, length: int, variant: str = "full", *, window: int | None = None,
                sinks: int = 0, bytes_per_element: int = 4, allmem: AllMemShape = AllMemShape()) -> int:
    """Inference cache of one sequence after `length` tokens: KV of the kept tokens plus the memory state."""
    wt = _budget(int(length), variant, window, sinks)
    kv = 2 * wt * shape.head_dim * shape.kv_heads
    return shape.layers * (kv + _memory_state_elements(shape, variant, allmem)) * bytes_per_element


def cost_table(shape: ModelShape, length: int, *, window: int, sinks: int = 0, bytes_per_element: int = 4,
               variants=VARIANTS, allmem: AllMemShape = AllMemShape()) -> dict:
    """{variant: {"mixing_flops", "model_flops", "cache_bytes"}} for a quick comparison (window ignored by 'full')."""
    table = {}
    for variant in variants:
        kw = dict(window=window, sinks=sinks, allmem=allmem)
        table[variant] = {
            "mixing_flops": mixing_flops(shape, length, variant, **kw),
            "model_flops": model_flops(shape, length, variant, **kw),
            "cache_bytes": cache_bytes(shape, length, variant, bytes_per_element=bytes_per_element, **kw),
        }
    return table
