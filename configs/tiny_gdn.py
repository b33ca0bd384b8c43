"""A tiny end-to-end run on CPU: a small Qwen2-architecture teacher, synthetic long-range recall data (shipped tiny
tokenizer), and a Gated DeltaNet memory distilled with a window much smaller than the tasks' distances.

    python -m ahn_jax.train --config=configs/tiny_gdn.py --workdir=/tmp/tiny_gdn

`get_config("dn" | "mamba2" | "allmem")` selects another memory (see tiny_dn.py etc.).
"""

from configs import base

TINY_TEACHER = {
    "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}

MEMORIES = {"gdn": "gated_deltanet", "dn": "deltanet", "mamba2": "mamba2", "allmem": "ttt_mlp"}


def get_config(arg=None):
    c = base.get_config()
    c.model.random_init = dict(TINY_TEACHER)
    c.model.dtype = "float32"
    c.ahn.memory = MEMORIES[arg or "gdn"]
    c.ahn.chunk_size = 32
    c.window.kind = "fixed"
    c.window.sink_kind = "fixed"
    c.window.fixed_window = 32
    c.window.fixed_sinks = 4
    c.window.max_window = 32
    c.window.max_sinks = 4
    c.data.kind = "synthetic"
    c.data.loss_mask = "all"
    c.data.min_length = 128
    c.data.filter_len = 64
    c.data.cutoff_len = 256
    c.data.buckets = (256,)
    c.data.max_samples = 4096
    c.train.steps = 20
    c.train.batch_size = 4
    c.train.accumulate = 1
    c.train.lr = 3e-3
    c.train.log_every = 1
    c.train.remat = False
    c.ckpt.every = 5
    c.mesh.data = -1
    return c
