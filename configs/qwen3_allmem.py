"""AllMem (TTT SwiGLU memory) on Qwen3-1.7B (ALLMEM.md §6 and §10 defaults): random window, sinks and write chunk
(chunk <= window), KL over every valid token (the memory acts at every position)."""

from configs import base


def get_config(arg=None):
    c = base.paper_recipe("ttt_mlp", arg)
    # The write chunk is fixed per run (the sampler's chunk draw is not used yet): 512 keeps chunk <= window for every
    # sampled window (ALLMEM.md §4.2); the inference default window is 4096 (LongBench setting, ALLMEM.md §1).
    c.ahn.chunk_size = 512
    c.window.fixed_window = 4096
    c.window.kind = "allmem"
    c.data.loss_mask = "all"
    c.data.filter_len = 512
    c.data.cutoff_len = 16384
    c.data.buckets = (4096, 8192, 16384)
    return c
