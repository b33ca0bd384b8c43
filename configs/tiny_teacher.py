"""Pretraining of the tiny teacher shipped in ahn_jax/data/tiny_teacher/ (train.mode = "lm", training/pretrain.py):
a small Qwen2-architecture model trained from scratch, all parameters, next-token CE with full attention, on the
synthetic long-range recall stream (shipped tiny tokenizer). Answers weigh more than the unpredictable filler.

    python -m ahn_jax.train --config=configs/tiny_teacher.py --workdir=/tmp/tiny_teacher
    # -> /tmp/tiny_teacher/teacher/ (HF dir) and teacher_eval.json (held-out answer accuracy)

The tasks (DEMO_TASKS) are shared with configs/tiny_{gdn,dn,mamba2,allmem}.py, which distil memories into it.
"""

from configs import base

TEACHER_ARCH = {
    "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}

# Recall and copy with evidence 8..192 tokens back: with the demo's 32-token window most answers need the memory.
DEMO_TASKS = {"tasks": ("recall", "copy"), "fact_prob": 0.5, "filler_words": (2, 6), "value_digits": (1, 2),
              "passage_words": (2, 6), "distance": (8, 192)}
DEMO_LENGTH = 256


def set_demo_data(c):
    """The demo's synthetic documents, shared by the teacher and the memories distilled into it (loss on every
    position; tiny_gdn's KL skips the positions before the window itself)."""
    c.data.kind = "synthetic"
    c.data.tasks = dict(DEMO_TASKS)
    c.data.loss_mask = "all"
    c.data.min_length = DEMO_LENGTH
    c.data.filter_len = 64
    c.data.cutoff_len = DEMO_LENGTH
    c.data.buckets = (DEMO_LENGTH,)
    c.data.max_samples = 1 << 20


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.model.random_init = dict(TEACHER_ARCH)
    c.model.dtype = "float32"
    c.window.fixed_window = 32  # only used by the held-out report (beyond-window answers of the demo's window)
    c.window.fixed_sinks = 4
    set_demo_data(c)
    c.train.mode = "lm"
    c.train.answer_weight = 10.0
    c.train.init = "fan_in"  # pretrain.fan_in_init: the 0.02 init left attention uniform (a recall plateau)
    c.train.steps = 6000
    c.train.batch_size = 8
    c.train.accumulate = 1
    c.train.lr = 3e-3
    c.train.warmup_ratio = 0.02
    c.train.weight_decay = 0.01
    c.train.log_every = 100
    c.mesh.data = -1  # every local device (batch 8 divides over 1, 2, 4 or 8)
    return c
