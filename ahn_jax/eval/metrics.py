"""Scoring functions of LongBench and LV-Eval, named as in LongBench's `metrics.py`, written from their definitions.

Every metric is `metric(prediction: str, ground_truth: str, **kwargs) -> float in [0, 1]`; extra keyword arguments
(all_classes, answer_keywords, ...) are accepted and ignored by metrics that do not use them, so a scorer can pass the
same fields to every metric.

Normalisation (the official one):
  English  lower-case -> drop ASCII punctuation -> drop the articles a|an|the -> collapse whitespace; tokens = words.
  Chinese  lower-case -> drop ASCII and Chinese punctuation -> drop all whitespace; tokens = characters.
Deviation: LongBench and LV-Eval segment Chinese into words with jieba, which is not installed here. We score Chinese
on characters. Character F1 and character ROUGE-L are usually a little higher than word-level scores (partial words
get partial credit), so Chinese numbers are comparable between our runs but not exactly to published tables.

ROUGE-L: F1 of the longest common subsequence of whitespace tokens (precision = LCS / len(prediction), recall =
LCS / len(reference)), case kept as the `rouge` package keeps it, '.' treated as a separator (that package splits
sentences on '.'). The `rouge` package computes a summary-level union-LCS over those sentences; on one-sentence
answers the two agree, on multi-sentence summaries ours can differ slightly.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter

# Chinese (full-width) punctuation removed by the zh normalisation, besides ASCII string.punctuation.
ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏．"
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# English stop words dropped from LV-Eval's answer keywords before the keyword-recall gate (our own short list of
# function words; LV-Eval ships a longer one, so a keyword that is a rare function word may gate differently).
EN_STOP_WORDS = frozenset("""
a an the and or but if of at by for with about against between into through during before after above below to from
up down in out on off over under again further then once here there when where why how all any both each few more most
other some such no nor not only own same so than too very s t can will just don should now i me my we our you your he
him his she her it its they them their what which who whom this that these those am is are was were be been being have
has had having do does did doing would could might must shall may
""".split())
# Chinese function characters/words dropped by the zh keyword gate and by the LV-Eval dureader "blacklist" ROUGE
# (our own short list; LV-Eval's blacklist is longer and word-level).
ZH_STOP_WORDS = frozenset("的了和是在也就都而及与着或之其")


def normalize_answer(text: str) -> str:
    """English normalisation: lower-case, remove punctuation, remove articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _EN_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower-case, remove ASCII and Chinese punctuation, remove all whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


def _token_f1(prediction_tokens, ground_truth_tokens) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when either side is empty or nothing overlaps."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _zh_tokens(text: str) -> list[str]:
    return list(normalize_zh_answer(text))


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 after English normalisation."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Character F1 after Chinese normalisation (LongBench: jieba words; see module docstring)."""
    return _token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_f(prediction_tokens, reference_tokens) -> float:
    if not prediction_tokens or not reference_tokens:
        return 0.0
    lcs = lcs_length(prediction_tokens, reference_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction_tokens), lcs / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def _rouge_tokens(text: str) -> list[str]:
    return text.replace(".", " ").split()


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F over whitespace tokens (see module docstring); 0 for an empty prediction."""
    return _rouge_l_f(_rouge_tokens(prediction), _rouge_tokens(ground_truth))


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F over characters (whitespace dropped, punctuation kept as jieba keeps it as tokens)."""
    return _rouge_l_f(list("".join(prediction.split())), list("".join(ground_truth.split())))


def rouge_zh_score_blacklist(prediction: str, ground_truth: str, **kwargs) -> float:
    """LV-Eval's dureader metric: zh ROUGE-L F on normalised characters with stop words (ZH_STOP_WORDS) removed."""
    keep = lambda text: [c for c in normalize_zh_answer(text) if c not in ZH_STOP_WORDS]  # noqa: E731
    return _rouge_l_f(keep(prediction), keep(ground_truth))


def classification_score(prediction: str, ground_truth: str, all_classes=(), **kwargs) -> float:
    """1 / (number of matched classes) if the true class is among the class names found in the prediction, else 0.

    A class name found in the prediction that is only a substring of the true class (and not equal to it) does not
    count as a competing match (LongBench's rule; written here without its remove-while-iterating list mutation).
    """
    matched = [c for c in all_classes if c in prediction]
    matched = [c for c in matched if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"retrieval ground truth {ground_truth!r} does not match {pattern!r}")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == found[0] for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction equal to the paragraph number in 'Paragraph N'."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction equal to the paragraph number in '段落N'."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction equal to the ground-truth count."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Character similarity of the first code line of the prediction to the reference line.

    The first line that holds no '`', '#' or '//' (markdown fences and comments) is compared. Similarity is
    round(100 * difflib.SequenceMatcher(None, a, b).ratio()) / 100. LongBench uses fuzzywuzzy's `fuzz.ratio`, which
    is the same definition (2 * matches / total length, rounded to an integer percentage); fuzzywuzzy with
    python-Levenshtein installed can differ by a point on some pairs.
    """
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return round(100 * difflib.SequenceMatcher(None, line, ground_truth).ratio()) / 100


def _keywords(answer_keywords) -> str:
    return " ".join(answer_keywords) if isinstance(answer_keywords, (list, tuple)) else str(answer_keywords or "")


def _keyword_recall(prediction_tokens, keyword_tokens) -> float:
    common = Counter(prediction_tokens) & Counter(keyword_tokens)
    return sum(common.values()) / len(keyword_tokens)


def qa_f1_score_with_gold_ans(prediction: str, ground_truth: str, answer_keywords=None, **kwargs) -> float:
    """LV-Eval EN: 0 unless the prediction recalls >= 0.2 of the answer keywords (normalised, stop words removed),
    else the token F1 against the ground truth. Without keywords (or only stop words) the gate is skipped."""
    prediction_tokens = normalize_answer(prediction).split()
    keywords = [t for t in normalize_answer(_keywords(answer_keywords)).split() if t not in EN_STOP_WORDS]
    if keywords and _keyword_recall(prediction_tokens, keywords) < 0.2:
        return 0.0
    return _token_f1(prediction_tokens, normalize_answer(ground_truth).split())


def qa_f1_zh_score_with_gold_ans(prediction: str, ground_truth: str, answer_keywords=None, **kwargs) -> float:
    """LV-Eval ZH: as the EN variant on characters, with threshold 0.4 (LV-Eval: jieba words)."""
    prediction_tokens = _zh_tokens(prediction)
    keywords = [c for c in _zh_tokens(_keywords(answer_keywords)) if c not in ZH_STOP_WORDS]
    if keywords and _keyword_recall(prediction_tokens, keywords) < 0.4:
        return 0.0
    return _token_f1(prediction_tokens, _zh_tokens(ground_truth))


def string_match_all(prediction: str, ground_truth, **kwargs) -> float:
    """RULER-style needle score: share of the references found (case-insensitive) in the prediction."""
    refs = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
    return sum(r.lower() in prediction.lower() for r in refs) / len(refs)


LONGBENCH_METRICS = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
# LongBench scores only the first line of the prediction for these few-shot datasets.
LONGBENCH_FIRST_LINE = ("trec", "triviaqa", "samsum", "lsht")

LVEVAL_METRICS = {
    "hotpotwikiqa_mixup": qa_f1_score_with_gold_ans, "loogle_SD_mixup": qa_f1_score_with_gold_ans,
    "loogle_CR_mixup": qa_f1_score_with_gold_ans, "loogle_MIR_mixup": qa_f1_score_with_gold_ans,
    "multifieldqa_en_mixup": qa_f1_score_with_gold_ans, "multifieldqa_zh_mixup": qa_f1_zh_score_with_gold_ans,
    "cmrc_mixup": qa_f1_zh_score_with_gold_ans, "lic_mixup": qa_f1_zh_score_with_gold_ans,
    "factrecall_en": qa_f1_score, "factrecall_zh": qa_f1_zh_score, "dureader_mixup": rouge_zh_score_blacklist,
}

INFINITEBENCH_METRICS = {"longbook_qa_eng": rouge_score, "longbook_qa_chn": rouge_zh_score}


def score_sample(metric, prediction: str, answers, *, first_line=False, first_reference_only=False,
                 **fields) -> float:
    """Best score over the references (or the first reference only, as LV-Eval scores), in [0, 1]."""
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("sample has no reference answers")
    if first_reference_only:
        answers = answers[:1]
    return max(metric(prediction, a, **fields) for a in answers)


def mean_score(scores) -> float:
    """Mean over samples, x100, rounded to 2 decimals (the benchmarks' reporting convention); nan when empty."""
    scores = list(scores)
    return round(100.0 * sum(scores) / len(scores), 2) if scores else float("nan")
