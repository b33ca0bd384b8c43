"""The CPU demo: distil a Gated DeltaNet memory into the tiny pretrained teacher shipped in ahn_jax/data/tiny_teacher/
(configs/tiny_teacher.py made it) on synthetic long-range recall data, with a 32-token window (+ 4 sinks) much smaller
than the tasks' evidence distances (8..192 tokens). The run ends with WORKDIR/report.json and a printed table: on
held-out answers whose evidence lies beyond the window, the accuracy of the teacher, of window + sinks alone and of
window + sinks + memory, plus the KL to the teacher.

    python -m ahn_jax.train --config=configs/tiny_gdn.py --workdir=/tmp/tiny_gdn

`get_config("dn" | "mamba2" | "allmem")` selects another memory (configs/tiny_dn.py etc. do exactly that).
"""

import os

import ahn_jax.data

from ml_collections import config_dict

from configs import base, tiny_teacher

TINY_TEACHER_DIR = os.path.join(os.path.dirname(ahn_jax.data.__file__), "tiny_teacher")
TINY_TOKENIZER_DIR = os.path.join(os.path.dirname(ahn_jax.data.__file__), "tiny_tokenizer")

MEMORIES = {"gdn": "gated_deltanet", "dn": "deltanet", "mamba2": "mamba2", "allmem": "ttt_mlp"}


def get_config(arg=None):
    c = base.get_config()
    name = arg or "gdn"
    if name not in MEMORIES:
        raise ValueError(f"tiny config argument must be one of {sorted(MEMORIES)}, got {name!r}")
    c.model.path = TINY_TEACHER_DIR
    c.model.dtype = "float32"
    c.ahn.memory = MEMORIES[name]
    c.ahn.chunk_size = 32
    c.window.kind = "fixed"
    c.window.sink_kind = "fixed"
    c.window.fixed_window = 32
    c.window.fixed_sinks = 4
    c.window.max_window = 32
    c.window.max_sinks = 4
    tiny_teacher.set_demo_data(c)  # KL on every position past the window (AHN.md §4); loss_mask="answer": answers only
    c.data.tokenizer = TINY_TOKENIZER_DIR
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.accumulate = 1
    c.train.lr = 3e-3
    c.train.warmup_ratio = 0.05
    c.train.log_every = 25
    c.train.remat = False
    c.ckpt.every = 100
    c.mesh.data = -1  # every local device (batch 8 divides over 1, 2, 4 or 8)
    c.demo = config_dict.ConfigDict()
    c.demo.seed = 2024  # held-out documents: split "heldout" of this seed (disjoint from the training stream)
    c.demo.length = tiny_teacher.DEMO_LENGTH
    c.demo.documents = 64
    return c
