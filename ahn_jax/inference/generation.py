"""Text generation with the constant-size cache: `ahn_jax.generate(model, tokenizer, prompt_or_messages, ...)`.

The prompt goes through the tokenizer's chat template (a list of {"role", "content"} messages, or a plain string
turned into one user message when the tokenizer has a template and chat is not False), is prefilled in chunks, then
tokens are sampled one at a time, or for greedy decoding (temperature <= 0) taken in blocks of GREEDY_BLOCK per
compiled device loop, until a stop token or max_new_tokens. Text is streamed to a callback as it becomes decodable
(per block when greedy); prefill and decode tokens/s are printed at the end (stderr).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ahn_jax.inference.decode import Decoder
from ahn_jax.inference.sampling import sample


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stopped_by: str  # "stop_token" | "max_new_tokens"
    stop_token_id: int | None = None  # the sampled stop token (not part of token_ids / text)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill's logits: decode produced the others.
        return max(len(self.token_ids) - 1, 0) / max(self.decode_seconds, 1e-9)

    def __str__(self) -> str:
        return self.text


def prompt_ids(tokenizer, prompt, *, chat=None) -> list:
    """prompt: str or a list of {"role", "content"} messages -> token ids (chat template applied where asked/able)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if chat is True and not has_template:
            raise ValueError("generate: chat=True but the tokenizer has no chat_template")
        if not (chat if chat is not None else has_template):
            return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                        for m in prompt):
        raise ValueError("generate: prompt must be a string or a list of {'role': ..., 'content': ...} messages")
    if not has_template:
        raise ValueError("generate: messages need a tokenizer with a chat_template")
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, stop_tokens=None) -> set:
    """The tokenizer's eos and <|im_end|> (chat models end their turn with it), plus `stop_tokens` (ids or token
    strings; an unknown string is an error)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        ids.add(int(vocab["<|im_end|>"]))
    for tok in stop_tokens or ():
        if isinstance(tok, str):
            if tok not in vocab:
                raise ValueError(f"generate: stop token {tok!r} is not in the tokenizer's vocabulary")
            ids.add(int(vocab[tok]))
        else:
            ids.add(int(tok))
    return ids


class _Streamer:
    """Decodes the generated ids so far and hands out only the new, complete text (no half UTF-8 characters)."""

    def __init__(self, tokenizer, callback):
        self.tokenizer, self.callback, self.sent = tokenizer, callback, ""

    def update(self, ids, final=False):
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if self.callback is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.callback(text[len(self.sent):])
        self.sent = text


# Greedy decoding runs this many tokens per compiled device loop (Decoder.greedy) and checks stop tokens after each
# block: one host round trip per block instead of per token. On an H100 the hybrid's per-token host work (XLA
# re-recording its CUDA graph) made a batch-1 step 6.5-11 ms where the GPU needs 5.3 (benchmarks/RESULTS.md). A block
# may run a few tokens past a stop token or max_new_tokens; they are dropped (the cache is not returned).
GREEDY_BLOCK = 16


def generate(model, tokenizer, prompt, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_tokens=None, stream=None, seed: int = 0, chat=None, teacher: bool = False,
             chunk=None, decoder: Decoder | None = None, print_stats: bool = True,
             greedy_block: int | None = None) -> GenerationResult:
    """Generate a reply to `prompt` (str or chat messages) with the fixed-size cache.

    temperature <= 0: greedy; else sampling with top_k (0 = off) and top_p (1.0 = off) from a PRNG key made from
    `seed`. stop_tokens: extra stop ids or token strings (eos and <|im_end|> always stop; the stop token is not in the
    text). stream: callable(str) receiving text pieces as they are generated. teacher: full attention with a growing
    KV cache (for comparison). chunk: prefill chunk (default 4096). decoder: a Decoder to reuse across calls (its
    compiled functions are kept). greedy_block: greedy tokens per device loop (default GREEDY_BLOCK; 1 = one host call
    per token; sampling always goes token by token). Returns a GenerationResult (text, token_ids, timings).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    block = GREEDY_BLOCK if greedy_block is None else greedy_block
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"generate: greedy_block must be an int >= 1, got {block!r}")
    block = block if temperature <= 0 else 1
    ids = prompt_ids(tokenizer, prompt, chat=chat)
    if not ids:
        raise ValueError("generate: the prompt is empty after tokenisation")
    stops = stop_token_ids(tokenizer, stop_tokens)
    dec = decoder if decoder is not None else Decoder(model, teacher=teacher)
    key = jax.random.key(seed)
    pick = jax.jit(lambda logits, k: sample(logits, k, temperature=temperature, top_k=top_k, top_p=top_p))
    streamer = _Streamer(tokenizer, stream)

    start = time.perf_counter()
    # The teacher's KV buffer also holds what a last greedy block runs past max_new_tokens.
    logits, cache = dec.prefill(np.asarray([ids], np.int32), chunk=chunk,
                                max_length=len(ids) + max_new_tokens + block if dec.teacher else None)
    key, sub = jax.random.split(key)
    token = int(pick(logits, sub)[0])  # blocks until the prefill is done
    prefill_s = time.perf_counter() - start

    new, pending, stopped_by = [], [], "max_new_tokens"
    start = time.perf_counter()
    while True:
        if token in stops:
            stopped_by = "stop_token"
            break
        new.append(token)
        streamer.update(new)
        if len(new) >= max_new_tokens:
            break
        if not pending:
            if block > 1:  # greedy: `block` tokens in one device loop, read back once
                generated, cache = dec.greedy(jnp.asarray([[token]], jnp.int32), cache, block)
                pending = [int(t) for t in np.asarray(generated)[0]]
            else:
                logits, cache = dec.decode(jnp.asarray([token], jnp.int32), cache)
                key, sub = jax.random.split(key)
                pending = [int(pick(logits, sub)[0])]
        token = pending.pop(0)
    decode_s = time.perf_counter() - start
    streamer.update(new, final=True)
    result = GenerationResult(text=streamer.sent, token_ids=new, prompt_tokens=len(ids), prefill_seconds=prefill_s,
                              decode_seconds=decode_s, stopped_by=stopped_by,
                              stop_token_id=token if stopped_by == "stop_token" else None)
    if print_stats:
        print(f"\n[prefill] {result.prompt_tokens} tokens in {prefill_s:.2f} s ({result.prefill_tokens_per_s:.1f} "
              f"tok/s)  [decode] {len(new)} tokens in {decode_s:.2f} s ({result.decode_tokens_per_s:.1f} tok/s; "
              f"first calls include compilation)  stopped by {stopped_by}", file=sys.stderr)
    return result
