"""AHN-gated_deltanet on Qwen2.5-7B-Instruct with the paper's recipe (AHN.md §7): random window and sinks, KL at T=1 on answer tokens
past the window, AdamW 1e-4, 740 updates of 128 sequences of up to 24,576 tokens (ChatQA2 long SFT).

Set --config.model.path to a local copy of Qwen2.5-7B-Instruct and --config.data.path to the ChatQA2 JSONL/parquet file.
"""

from configs import base


def get_config(arg=None):
    c = base.paper_recipe("gated_deltanet", arg)
    return c
