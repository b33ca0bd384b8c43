"""Base configuration for `python -m ahn_jax.train`: every key the trainer reads, with the AHN paper's recipe as the
default (AHN.md §7). Other configs start from this one and change what differs. `get_config(arg)` takes an optional
string argument (`--config=configs/base.py:ARG`), unused here.

Override any key on the command line: `--config.train.steps=100 --config.model.path=/models/qwen`.
"""

from ml_collections import config_dict


def get_config(arg=None):
    del arg
    c = config_dict.ConfigDict()

    c.model = config_dict.ConfigDict()
    c.model.path = ""  # local HF directory (config.json + safetensors) or an Orbax directory written by convert
    c.model.dtype = "bfloat16"  # dtype of the frozen base weights and activations
    # A random-initialised base model instead of model.path (tests, CPU demos): a dict of config.json fields.
    c.model.random_init = config_dict.placeholder(dict)

    c.ahn = config_dict.ConfigDict()
    c.ahn.memory = "gated_deltanet"  # gated_deltanet | deltanet | mamba2 | ttt_mlp
    c.ahn.layers = config_dict.placeholder(tuple)  # None: every layer gets a memory
    c.ahn.chunk_size = 64  # memory op chunk (TTT: the write chunk when window.kind is fixed)
    c.ahn.impl = "auto"  # memory op implementation
    c.ahn.attention_impl = "auto"
    c.ahn.weights = ""  # optional AHN-only safetensors to start from

    c.window = config_dict.ConfigDict()
    c.window.kind = "random"  # random (AHN.md §3.3) | fixed
    c.window.sink_kind = "random"  # random | fixed | prefix
    c.window.fixed_window = 256
    c.window.fixed_sinks = 0
    c.window.max_window = 8192  # static bound for traced windows (block range of the attention)
    c.window.max_sinks = 4096
    # False: window/sinks are traced (one compilation; blockwise xla attention). True: one compiled step per sampled
    # (window, sinks) pair, which reaches the cuDNN / Pallas attention kernels on GPU.
    c.window.static = False

    c.data = config_dict.ConfigDict()
    c.data.kind = "chat_jsonl"  # chat_jsonl | chat_parquet | text_jsonl | tfds | synthetic
    c.data.path = ""
    c.data.tokenizer = ""  # default: the model directory's tokenizer
    c.data.loss_mask = "answer"  # answer (assistant tokens) | all
    c.data.filter_len = 288  # drop records not longer than this (must exceed the largest window)
    c.data.cutoff_len = 24576  # truncate longer records
    c.data.buckets = (2048, 4096, 8192, 16384, 24576)
    c.data.shuffle_seed = 0
    c.data.max_samples = 100000

    c.train = config_dict.ConfigDict()
    c.train.steps = 740  # optimiser updates
    c.train.batch_size = 1  # sequences per micro-step, across all devices
    c.train.accumulate = 128  # micro-steps per update (global batch = batch_size * accumulate)
    c.train.lr = 1e-4
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.1
    c.train.clip = 1.0
    c.train.temperature = 1.0  # KL temperature
    c.train.ce_weight = 0.0  # add the student's CE (ablation; AHN.md §4)
    c.train.remat = True  # rematerialise each layer in the backward pass
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.export_ahn = True  # write the trained memory as AHN-only safetensors at the end

    c.ckpt = config_dict.ConfigDict()
    c.ckpt.every = 100
    c.ckpt.keep = 3
    c.ckpt.async_save = True

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def paper_recipe(memory, arg=None):
    """The AHN paper's recipe for one memory on a GPU: the base config with static windows (one compilation per sampled
    (window, sinks) value reaches the cuDNN / Pallas attention kernels: 4.3x faster per step than traced windows on an
    H100 at 3B shapes, benchmarks/RESULTS.md)."""
    c = get_config(arg)
    c.ahn.memory = memory
    c.window.static = True
    return c
