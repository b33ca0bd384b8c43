"""Benchmark samples from local JSONL files (LongBench, LV-Eval, InfiniteBench) or a seeded generator (needle), and
the token-level prompt preparation they share: middle (or left) truncation and the chat template by model family.

Files the user downloads (we never fetch anything):
  LongBench      <data>/<dataset>.jsonl            {"input", "context", "answers", "all_classes", "length", "dataset",
                                                    "_id"}
  LV-Eval        <data>/<dataset>_<level>.jsonl    {"input", "context", "answers", "answer_keywords", ...}
  InfiniteBench  <data>/<split>.jsonl              {"context", "input", "answer"}   (longbook_qa_eng / _chn)

Prompt wording: the official LongBench and LV-Eval prompt texts were not at hand, so every template below is our own
wording with the same structure (task instruction, context, question, answer cue). Scores are therefore close to but
not identical with published tables. InfiniteBench's QA prompt follows the AHN harness description (AHN.md §8.1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from ahn_jax.eval import metrics as M

# --- LongBench -------------------------------------------------------------------------------------------------------
_QA_EN = ("Answer the question using the passages below. Give only the answer, with no other words.\n\n{context}\n\n"
          "Question: {input}\nAnswer:")
_QA_ZH = "请阅读以下文章并回答问题，只给出答案，不要输出其他文字。\n\n{context}\n\n问题：{input}\n回答："
_SUMMARY_EN = "Read the text below and write a summary.\n\n{context}\n\n{input}\nSummary:"
LONGBENCH_PROMPTS = {
    "narrativeqa": ("You are given a story and a question about it. Answer as briefly as you can, in one phrase if "
                    "possible.\n\nStory: {context}\n\nQuestion: {input}\nAnswer:"),
    "qasper": ("You are given a scientific article and a question. Answer in one phrase or sentence; write "
               "\"unanswerable\" if the article does not say, or \"yes\"/\"no\" for yes/no questions.\n\n{context}\n\n"
               "Question: {input}\nAnswer:"),
    "multifieldqa_en": _QA_EN, "hotpotqa": _QA_EN, "2wikimqa": _QA_EN, "musique": _QA_EN,
    "multifieldqa_zh": _QA_ZH, "dureader": "请根据以下搜索结果回答问题。\n\n{context}\n\n问题：{input}\n回答：",
    "gov_report": "Write a one-page summary of the government report below.\n\n{context}\n\nSummary:",
    "qmsum": ("Below is a meeting transcript and a query about it. Answer the query in a few sentences.\n\n"
              "Transcript: {context}\n\nQuery: {input}\nAnswer:"),
    "multi_news": "Write a one-page summary of all the news articles below.\n\n{context}\n\nSummary:",
    "vcsum": "请为下面的会议记录写一段总结。\n\n{context}\n\n会议总结：",
    "trec": "Classify the type of each question, following the examples.\n\n{context}\n{input}",
    "triviaqa": "Answer the question after these examples, in the same format.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue, following the examples.\n\n{context}\n\n{input}",
    "lsht": "请判断新闻的类别，参照下面的示例。\n\n{context}\n{input}",
    "passage_count": ("Below are several paragraphs, some of them repeated. How many distinct paragraphs are there? "
                      "Reply with one number.\n\n{context}\n\nThe number of distinct paragraphs is:"),
    "passage_retrieval_en": ("Below are 30 paragraphs and an abstract. Which paragraph does the abstract summarise? "
                             "Reply like \"Paragraph 1\".\n\n{context}\n\nAbstract: {input}\n\nThe answer is:"),
    "passage_retrieval_zh": "以下有若干段落和一个摘要，请指出摘要来自哪个段落，格式如“段落1”。\n\n{context}\n\n摘要：{input}\n\n答案是：",
    "lcc": "Complete the code below.\n{context}Next line of code:\n",
    "repobench-p": "Complete the code below.\n{context}{input}Next line of code:\n",
}
# AHN.md §8.1 for the six AHN tasks (qmsum 500); LongBench's own values for the rest.
LONGBENCH_MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 500, "multi_news": 512, "vcsum": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
# Few-shot and code-completion prompts are fed raw even to chat models (LongBench; AHN.md §8.1 "triviaqa: no chat").
LONGBENCH_NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
AHN_LONGBENCH = ("dureader", "hotpotqa", "musique", "narrativeqa", "qmsum", "triviaqa")

# --- LV-Eval ---------------------------------------------------------------------------------------------------------
LVEVAL_DATASETS = tuple(M.LVEVAL_METRICS)
_LV_EN = ("Read the passages below and answer the question. Give only the answer.\n\n{context}\n\n"
          "Question: {input}\nAnswer:")
_LV_ZH = "请阅读以下文章并回答问题，只给出答案。\n\n{context}\n\n问题：{input}\n回答："
LVEVAL_PROMPTS = {d: (_LV_ZH if d in ("multifieldqa_zh_mixup", "cmrc_mixup", "lic_mixup", "dureader_mixup",
                                      "factrecall_zh") else _LV_EN) for d in LVEVAL_DATASETS}
LVEVAL_MAX_NEW_TOKENS = {d: (16 if d.startswith("factrecall") else 64) for d in LVEVAL_DATASETS}

# --- InfiniteBench ---------------------------------------------------------------------------------------------------
INFINITEBENCH_SPLITS = ("longbook_qa_eng", "longbook_qa_chn")
INFINITEBENCH_PROMPT = ("Read the book below and answer a question.\n\n{context}\n\nQuestion: {input}\n\n"
                        "Be very concise.")
INFINITEBENCH_MAX_NEW_TOKENS = 256

CHAT_FAMILIES = ("qwen2", "qwen3")


@dataclasses.dataclass
class Sample:
    """One evaluation item. `prompt` is the raw text before truncation and chat wrapping; `fields` are passed to the
    metric (all_classes, answer_keywords); `chat` says whether a chat model gets the chat template for it."""

    id: str
    dataset: str
    prompt: str
    answers: list
    max_new_tokens: int
    fields: dict = dataclasses.field(default_factory=dict)
    chat: bool = True
    length: int | None = None


def load_jsonl(path) -> list[dict]:
    """Records of a JSONL file; a malformed line is an error naming the file and line number."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
    return records


def _require(record: dict, keys, path, index):
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{path}: record {index} lacks field(s) {missing}")


def _as_list(answers) -> list:
    return [answers] if isinstance(answers, str) else list(answers)


def longbench_samples(data_dir, datasets=AHN_LONGBENCH, limit: int | None = None) -> list[Sample]:
    """LongBench samples from <data_dir>/<dataset>.jsonl, in file order (first `limit` per dataset)."""
    out = []
    for dataset in datasets:
        if dataset not in LONGBENCH_PROMPTS:
            raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {sorted(LONGBENCH_PROMPTS)}")
        path = pathlib.Path(data_dir) / f"{dataset}.jsonl"
        for i, r in enumerate(load_jsonl(path)[:limit]):
            _require(r, ("input", "context", "answers"), path, i)
            out.append(Sample(
                id=f"{dataset}/{r.get('_id', i)}", dataset=dataset,
                prompt=LONGBENCH_PROMPTS[dataset].format(context=r["context"], input=r["input"]),
                answers=_as_list(r["answers"]), max_new_tokens=LONGBENCH_MAX_NEW_TOKENS[dataset],
                fields={"all_classes": r.get("all_classes") or []}, chat=dataset not in LONGBENCH_NO_CHAT,
                length=r.get("length")))
    return out


def lveval_samples(data_dir, datasets=LVEVAL_DATASETS, level: str = "128k", limit: int | None = None) -> list[Sample]:
    """LV-Eval samples from <data_dir>/<dataset>_<level>.jsonl (e.g. cmrc_mixup_128k.jsonl)."""
    out = []
    for dataset in datasets:
        if dataset not in LVEVAL_PROMPTS:
            raise ValueError(f"unknown LV-Eval dataset {dataset!r}; known: {list(LVEVAL_DATASETS)}")
        path = pathlib.Path(data_dir) / f"{dataset}_{level}.jsonl"
        for i, r in enumerate(load_jsonl(path)[:limit]):
            _require(r, ("input", "context", "answers"), path, i)
            out.append(Sample(
                id=f"{dataset}_{level}/{r.get('_id', r.get('id', i))}", dataset=dataset,
                prompt=LVEVAL_PROMPTS[dataset].format(context=r["context"], input=r["input"]),
                answers=_as_list(r["answers"]), max_new_tokens=LVEVAL_MAX_NEW_TOKENS[dataset],
                fields={"answer_keywords": r.get("answer_keywords")}, length=r.get("length")))
    return out


def infinitebench_samples(data_dir, splits=INFINITEBENCH_SPLITS, limit: int | None = None) -> list[Sample]:
    """InfiniteBench QA samples from <data_dir>/<split>.jsonl; the English prompt for both splits (as AHN)."""
    out = []
    for split in splits:
        if split not in INFINITEBENCH_SPLITS:
            raise ValueError(f"unknown InfiniteBench split {split!r}; supported: {INFINITEBENCH_SPLITS}")
        path = pathlib.Path(data_dir) / f"{split}.jsonl"
        for i, r in enumerate(load_jsonl(path)[:limit]):
            _require(r, ("input", "context", "answer"), path, i)
            out.append(Sample(
                id=f"{split}/{r.get('id', i)}", dataset=split,
                prompt=INFINITEBENCH_PROMPT.format(context=r["context"], input=r["input"]),
                answers=_as_list(r["answer"]), max_new_tokens=INFINITEBENCH_MAX_NEW_TOKENS))
    return out


_NEEDLE_KEYS = ("amber", "cobalt", "falcon", "harbor", "juniper", "lantern", "meadow", "nebula", "orchid", "quarry")
_HAYSTACK = ("The river ran past the old mill and on toward the sea.", "Snow fell on the hills for most of the year.",
             "A small boat waited at the end of the long wooden pier.", "The market opened early and closed at noon.",
             "Birds gathered in the tall trees near the quiet road.", "Rain had left the stone path dark and cold.")


def needle_samples(tokenizer, lengths=(4096,), depths=(0.0, 0.25, 0.5, 0.75, 1.0), per_cell: int = 1, seed: int = 0,
                   haystack=_HAYSTACK, keys=_NEEDLE_KEYS) -> list[Sample]:
    """RULER-style single needle in a haystack, generated with a seeded numpy generator.

    For each context length (tokens, approximate: whole filler sentences are added until the count is reached) and
    depth (fraction of the haystack before the needle), `per_cell` samples "The special magic number for <key> is
    <7 digits>." hidden in filler text, asked back at the end. Dataset name "needle_<length>"; metric string match.
    """
    rng = np.random.default_rng(seed)
    sentence_tokens = [len(tokenizer.encode(" " + s, add_special_tokens=False)) for s in haystack]
    out = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depth {depth} must lie in [0, 1]")
            for j in range(per_cell):
                picks, total = [], 0
                while total < length:
                    k = int(rng.integers(len(haystack)))
                    picks.append(haystack[k])
                    total += sentence_tokens[k]
                key, value = keys[int(rng.integers(len(keys)))], str(int(rng.integers(10**6, 10**7)))
                cut = int(round(depth * len(picks)))
                needle = f"The special magic number for {key} is {value}."
                context = " ".join(picks[:cut] + [needle] + picks[cut:])
                prompt = (f"Some special magic numbers are hidden in the text below. Memorise them.\n\n{context}\n\n"
                          f"What is the special magic number for {key}? The special magic number for {key} is")
                out.append(Sample(id=f"needle_{length}/d{depth:.2f}/{j}", dataset=f"needle_{length}", prompt=prompt,
                                  answers=[value], max_new_tokens=16, fields={"depth": depth}))
    return out


# --- prompt preparation ----------------------------------------------------------------------------------------------
def model_family(model_dir_or_config) -> str:
    """The model family from config.json's `model_type` (a dict, a config.json path or a model directory).

    This, not a substring of the directory name, decides the chat template (AHN.md §10.1 #14: the reference harness
    checked for 'qwen2'/'qwen3' in the path, so a renamed directory silently lost its template).
    """
    config = model_dir_or_config
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}: cannot tell the model family")
        with open(path) as f:
            config = json.load(f)
    if "model_type" not in config:
        raise ValueError("config.json has no model_type: cannot tell the model family")
    return str(config["model_type"])


def truncate_tokens(ids, max_length: int, mode: str = "middle") -> list[int]:
    """Keep at most `max_length` tokens: "middle" keeps the first half and the last half (LongBench, LV-Eval;
    first max_length // 2, last max_length - max_length // 2); "left" keeps the last max_length tokens."""
    ids = list(ids)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if len(ids) <= max_length:
        return ids
    if mode == "middle":
        head = max_length // 2
        return ids[:head] + ids[len(ids) - (max_length - head):]
    if mode == "left":
        return ids[len(ids) - max_length:]
    raise ValueError(f"truncation mode {mode!r} is not 'middle' or 'left'")


def prompt_ids(tokenizer, sample: Sample, *, max_length: int, family: str, truncation: str = "middle") -> list[int]:
    """Token ids fed to the model: the raw prompt truncated to `max_length` tokens, then (for chat families and
    samples that take it) decoded and wrapped in the tokenizer's chat template with a generation prompt.

    Qwen3 templates get enable_thinking=False (answers are scored as plain text); other templates ignore it.
    """
    ids = truncate_tokens(tokenizer.encode(sample.prompt, add_special_tokens=False), max_length, truncation)
    if family not in CHAT_FAMILIES or not sample.chat:
        return ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model family {family!r} expects a chat template but the tokenizer has none")
    text = tokenizer.decode(ids)
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)
    return list(tokenizer.encode(wrapped, add_special_tokens=False))
