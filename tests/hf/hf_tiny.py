"""Tiny random transformers Qwen checkpoints, written by the tests themselves with save_pretrained.

Weights are perturbed after transformers' init so that biases and norm weights are random too (transformers
initialises biases to 0 and norms to 1, which would hide a missing bias or a wrong norm).
"""

import numpy as np

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6)

# name -> (family, config overrides); together they cover bias, q/k norm with head_dim != hidden/heads, tied and untied,
# and 1, 2 and 4 KV groups.
VARIANTS = {
    "qwen2_untied_g1": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2_tied_g2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_yarn_g4": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=False,
                                    rope_scaling={"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 128})),
    "qwen3_tied_g4_hd24": ("qwen3", dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True)),
    "qwen3_untied_g2_hd32": ("qwen3", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}


def make_hf_model(family, seed=0, **overrides):
    """A random transformers Qwen2/Qwen3 CausalLM in float32, eval mode."""
    import torch
    import transformers

    cls_cfg, cls_model = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    cfg = cls_cfg(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    model = cls_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def random_ids(batch, seq_len, vocab=TINY["vocab_size"], seed=0):
    return np.random.RandomState(seed).randint(0, vocab, size=(batch, seq_len)).astype(np.int32)


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
