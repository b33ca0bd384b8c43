"""Shared builders for the data tests: random ChatQA2-style records and small tokenizers."""

from __future__ import annotations

import json

import numpy as np

from ahn_jax.data import tokenizer as tiny

WORDS = tiny.FILLER_WORDS + tiny.KEY_WORDS


def random_words(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def chatqa2_record(rng, context_words=(30, 80), turns=1, system=True, answer_words=(2, 8)):
    """A ChatQA2 long-SFT style record: optional system, a long user context + question, assistant answers."""
    messages = [{"role": "system", "content": random_words(rng, 6)}] if system else []
    for turn in range(turns):
        n = int(rng.integers(*context_words)) if turn == 0 else 5
        messages.append({"role": "user", "content": random_words(rng, n) + " ?"})
        messages.append({"role": "assistant", "content": random_words(rng, int(rng.integers(*answer_words)))})
    return {"messages": messages}


def write_jsonl(path, rows):
    """rows: dicts (serialised) or raw strings (written verbatim, e.g. malformed lines)."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def mask_spans(mask):
    """[(start, end)] of the contiguous True runs of a 1-D bool array."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


QWEN3_LIKE_TEMPLATE = (
    # Mimics Qwen3's template: the final assistant turn gets an empty think block before the answer, and the
    # answer is lstripped of newlines; earlier turns are rendered plainly.
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'].lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_LIKE_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def bpe_tokenizer(chat_template, eos_token):
    """A byte-level BPE tokenizer trained in memory on the test vocabulary (merges straddle word pieces, unlike the
    word-level tiny tokenizer), wrapped as a transformers fast tokenizer with the given chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    corpus = [random_words(rng, 20) + " ? ." for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token="<|endoftext|>",
                                   chat_template=chat_template)
