"""Chat-template tokenization with loss masks (AHN.md §4 "Which tokens carry labels").

The template comes from the tokenizer itself (`apply_chat_template`), so every model family gets its own. Loss masks:
  "answer"  assistant answer tokens only (the reference's LLaMA-Factory default, train_on_prompt=False), plus the
            end-of-turn token that closes each answer (e.g. Qwen's "<|im_end|>"), so the student learns to stop.
  "all"     every token (the trainer later drops positions the window still sees).
The mask marks label tokens unshifted (like HF `labels != -100`): loss_mask[t] says token t is a target.

Locating answers: render the whole conversation once, then for each assistant message find its content in the rendered
text, searching from the end of the rendered conversation *before* that message (incremental rendering of
messages[:i]) and never before the previous answer. That is robust to templates that add text around answers (Qwen3's
empty think block, role headers, date lines) and to an answer string that also occurs in the prompt. Character spans
are mapped to tokens by the fast tokenizer's offsets; a token that straddles a span edge counts as inside.
"""

from __future__ import annotations

import numpy as np

from ahn_jax.data.sources import BadRecord

MASK_MODES = ("answer", "all")
# End-of-turn markers of the families we know; the tokenizer's own eos token is always tried first.
_TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


def _render(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _prefix_length(tokenizer, messages, i, full, floor):
    """Length of the rendered text before assistant message i, if the template renders prefixes consistently."""
    for gen in (True, False):
        try:
            prefix = _render(tokenizer, messages[:i], add_generation_prompt=gen)
        except Exception:  # some templates reject partial conversations; fall back to the running cursor
            continue
        if full.startswith(prefix) and len(prefix) >= floor:
            return len(prefix)
    return floor


def answer_char_spans(tokenizer, messages, full_text, include_turn_end=True):
    """[(start, end)] character spans of each assistant answer in `full_text` (the rendered conversation)."""
    markers = tuple(m for m in (getattr(tokenizer, "eos_token", None),) + _TURN_END_MARKERS if m)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        lo = _prefix_length(tokenizer, messages, i, full_text, cursor)
        content = message["content"]
        start = full_text.find(content, lo)
        if start < 0:  # templates may strip the answer (Qwen3 lstrips newlines)
            content = content.strip()
            start = full_text.find(content, lo)
        if start < 0 or not content:
            raise BadRecord("answer_not_in_template", f"assistant message {i} not found in the rendered template")
        end = start + len(content)
        if include_turn_end:
            for marker in markers:
                if full_text.startswith(marker, end):
                    end += len(marker)
                    break
        spans.append((start, end))
        cursor = end
    return spans


def _encode_with_offsets(tokenizer, text):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: answer masks need token offsets")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"], dtype=np.int32), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def tokenize_messages(tokenizer, messages, mask_mode="answer", include_turn_end=True):
    """Chat messages -> {"input_ids": int32 [T], "loss_mask": bool [T]} through the tokenizer's chat template."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template")
    full = _render(tokenizer, messages)
    ids, offsets = _encode_with_offsets(tokenizer, full)
    if mask_mode == "all":
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), dtype=bool)}
    mask = np.zeros(len(ids), dtype=bool)
    nonempty = offsets[:, 1] > offsets[:, 0]
    for start, end in answer_char_spans(tokenizer, messages, full, include_turn_end):
        mask |= nonempty & (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_text(tokenizer, text, add_eos=True):
    """Plain text -> {"input_ids", "loss_mask" (all True)}; appends the eos token so documents end visibly."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = np.asarray(ids, dtype=np.int32)
    return {"input_ids": ids, "loss_mask": np.ones(len(ids), dtype=bool)}


def tokenize_record(tokenizer, record, mask_mode="answer", add_eos=True):
    """A normalised record (sources.py) -> {"input_ids", "loss_mask"}. Plain text is always masked "all"."""
    if "messages" in record:
        return tokenize_messages(tokenizer, record["messages"], mask_mode)
    if "text" in record:
        return tokenize_text(tokenizer, record["text"], add_eos)
    raise BadRecord("unknown_record", f"record has neither 'messages' nor 'text': keys {sorted(record)}")
