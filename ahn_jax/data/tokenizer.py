"""The tiny tokenizer that ships with the project (ahn_jax/data/tiny_tokenizer/).

A word-level tokenizer over the synthetic tasks' vocabulary (synthetic.py), so the embedded tiny teacher and the CPU
demo need no network. Design choices, and why:
  - Words, digits and punctuation are split by a regex *before* a byte-level mapping, so a leading space is part of the
    token ("Ġfox" vs "fox") and newlines are tokens ("Ċ"): decode(encode(text)) == text for any text made of the
    vocabulary, exactly as with Qwen's byte-level BPE. Numbers are split into single digits (as Qwen does), so an answer
    like " 4 7 2" or " 472" is a few digit tokens whose evidence can be located digit by digit.
  - The special tokens and the ChatML chat template follow Qwen2/2.5 ("<|im_start|>role\\n...<|im_end|>\\n"), so the chat
    code path (chat.py) is exercised on the same template family as the real models.
  - Token ids are a pure function of the word lists below (no training), so `vocab()` can be used by the numpy
    generators without loading any tokenizer library; a test checks it against the shipped tokenizer.json.

Regenerate the shipped files with `python -m ahn_jax.data.tokenizer` (deterministic; needs only `tokenizers`).
"""

from __future__ import annotations

import json
import os
import pathlib

TINY_TOKENIZER_DIR = pathlib.Path(__file__).resolve().parent / "tiny_tokenizer"

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
SPECIALS = (EOS, IM_START, IM_END, UNK)

# Keys of associative-recall pairs and names of copied passages.
KEY_WORDS = (
    "fox", "owl", "cat", "dog", "elk", "yak", "bee", "ant", "bat", "cod", "eel", "emu", "gnu", "hen", "jay", "koi",
    "lark", "mole", "newt", "orca", "puma", "quail", "ram", "seal", "toad", "vole", "wasp", "wren", "zebu", "crab",
    "deer", "frog", "goat", "hare", "ibis", "lynx", "mink", "moth", "mule", "pika", "rook", "swan", "tern", "wolf",
    "apple", "brick", "cloud", "drum", "ember", "flute", "grape", "harp", "iron", "jade", "kite", "lamp", "maple",
    "noble", "olive", "pearl", "quartz", "river", "stone", "tulip",
)
# Variables of multi-hop bindings: disjoint from keys so a query names its task unambiguously.
VARIABLE_WORDS = tuple("v" + c for c in "abcdefghijklmnopqrstuvwxyz")
# Filler (distractor) words; also the words of copied passages.
FILLER_WORDS = (
    "a", "an", "and", "as", "at", "after", "again", "all", "also", "away", "back", "before", "big", "blue", "bright",
    "but", "by", "calm", "came", "cold", "dark", "day", "deep", "down", "each", "early", "east", "far", "fast", "few",
    "field", "fine", "for", "from", "full", "gold", "good", "great", "green", "grey", "had", "hard", "he", "high",
    "hill", "home", "hot", "in", "into", "it", "kind", "lake", "late", "light", "little", "long", "low", "many",
    "more", "most", "much", "near", "new", "night", "north", "now", "of", "old", "on", "once", "open", "over",
    "path", "quiet", "rain", "red", "road", "round", "sea", "she", "short", "slow", "small", "snow", "soft", "some",
    "south", "still", "sun", "tall", "then", "there", "they", "to", "tree", "under", "up", "very", "walked", "warm",
    "was", "water", "went", "west", "white", "wide", "wind", "with", "wood", "world", "year", "young",
)
# Words that give the tasks their structure (definitions, bindings, passages, queries) and the chat roles.
STRUCTURE_WORDS = (
    "the", "is", "what", "let", "be", "key", "value", "note", "passage", "repeat", "end", "question", "answer",
    "system", "user", "assistant",
)
DIGITS = tuple("0123456789")
PUNCTUATION = (".", ",", ":", ";", "?", "=", "!", "-")

# Split before the byte-level mapping: an optional space + one word, one digit, or one punctuation mark; or one
# whitespace character. Every character of any input falls in exactly one piece.
_SPLIT_PATTERN = r" ?[A-Za-z_]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _byte_level(piece: str) -> str:
    """The GPT-2 byte-to-unicode mapping restricted to what the vocabulary needs (space -> Ġ, newline -> Ċ)."""
    return piece.replace(" ", "\u0120").replace("\n", "\u010a")


def base_words() -> tuple[str, ...]:
    """Every non-special vocabulary item without its leading-space variant, in id order (deduplicated)."""
    seen, out = set(), []
    for w in STRUCTURE_WORDS + KEY_WORDS + VARIABLE_WORDS + FILLER_WORDS + DIGITS + PUNCTUATION:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


def vocab() -> dict[str, int]:
    """Token string (byte-level form) -> id. Specials first, then newline/space, then each word and ' '+word."""
    tokens = list(SPECIALS) + [_byte_level("\n"), _byte_level(" ")]
    for w in base_words():
        tokens.append(w)
        tokens.append(_byte_level(" " + w))
    return {t: i for i, t in enumerate(tokens)}


def word_id(word: str, leading_space: bool = True) -> int:
    """Id of one vocabulary word (or digit / punctuation), with or without its leading space."""
    table = vocab()
    key = _byte_level((" " if leading_space else "") + word)
    if key not in table:
        raise KeyError(f"word {word!r} is not in the tiny tokenizer's vocabulary")
    return table[key]


def build_tiny_tokenizer():
    """Build the `tokenizers.Tokenizer` (WordLevel model, regex split + byte-level pre-tokenizer/decoder)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def tokenizer_config() -> dict:
    """Contents of tokenizer_config.json: the fast tokenizer class, special tokens and the ChatML chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tiny_tokenizer(out_dir: str | os.PathLike = TINY_TOKENIZER_DIR) -> pathlib.Path:
    """Write tokenizer.json and tokenizer_config.json into `out_dir` (temporary names, then rename)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": build_tiny_tokenizer().to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2) + "\n",
    }
    for name, text in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    return out


def load_tiny_tokenizer():
    """The shipped tokenizer through transformers (offline): `AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))


if __name__ == "__main__":
    print(save_tiny_tokenizer())
