"""Chat-template tokenization: answer masks decode to exactly the assistant answers, for several template styles."""

import numpy as np
import pytest

from ahn_jax.data import chat, sources
from ahn_jax.data.tokenizer import load_tiny_tokenizer

from data_test_helpers import LLAMA3_LIKE_TEMPLATE, QWEN3_LIKE_TEMPLATE, bpe_tokenizer, chatqa2_record, mask_spans


def _tokenizers():
    return {
        "tiny_chatml": (load_tiny_tokenizer(), "<|im_end|>"),
        "bpe_chatml": (bpe_tokenizer(load_tiny_tokenizer().chat_template, "<|im_end|>"), "<|im_end|>"),
        "bpe_qwen3_like": (bpe_tokenizer(QWEN3_LIKE_TEMPLATE, "<|im_end|>"), "<|im_end|>"),
        "bpe_llama3_like": (bpe_tokenizer(LLAMA3_LIKE_TEMPLATE, "<|eot_id|>"), "<|eot_id|>"),
    }


TOKENIZERS = _tokenizers()


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("turns", [1, 3])
def test_answer_mask_decodes_to_exactly_the_answers(name, turns):
    tok, turn_end = TOKENIZERS[name]
    rng = np.random.default_rng(turns)
    for _ in range(5):
        record = sources.normalize_record(chatqa2_record(rng, turns=turns))
        ex = chat.tokenize_messages(tok, record["messages"], "answer")
        # The ids are those of the template itself (no extra/missing tokens).
        rendered = tok.apply_chat_template(record["messages"], tokenize=False)
        assert ex["input_ids"].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        spans = mask_spans(ex["loss_mask"])
        assert len(spans) == len(answers)
        for (a, b), answer in zip(spans, answers):
            assert tok.decode(ex["input_ids"][a:b]) == answer + turn_end


def test_answer_text_repeated_in_prompt_is_masked_only_in_the_answer():
    tok, _ = TOKENIZERS["bpe_chatml"]
    messages = [{"role": "user", "content": "fox owl ? fox owl"}, {"role": "assistant", "content": "fox owl"}]
    ex = chat.tokenize_messages(tok, messages, "answer", include_turn_end=False)
    (a, b), = mask_spans(ex["loss_mask"])
    assert tok.decode(ex["input_ids"][a:b]) == "fox owl"
    prompt_len = len(tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    assert a >= prompt_len


def test_all_mode_and_plain_text():
    tok = load_tiny_tokenizer()
    record = sources.normalize_record(chatqa2_record(np.random.default_rng(1)))
    ex = chat.tokenize_messages(tok, record["messages"], "all")
    assert ex["loss_mask"].all() and len(ex["input_ids"]) > 20
    text = chat.tokenize_record(tok, {"text": "the fox walked home ."}, "answer")
    assert text["loss_mask"].all()
    assert tok.decode(text["input_ids"]) == "the fox walked home ." + tok.eos_token


def test_bad_mask_mode_and_missing_template_are_clear_errors():
    tok = load_tiny_tokenizer()
    with pytest.raises(ValueError, match="mask_mode"):
        chat.tokenize_messages(tok, [{"role": "user", "content": "a"}], "prompt")
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        chat.tokenize_messages(tok, [{"role": "user", "content": "a"}], "answer")
