"""Metrics against hand-computed cases following the official normalisation (LongBench / LV-Eval definitions)."""

import math

import pytest

from ahn_jax.eval import metrics as M
from ahn_jax.eval.tasks import AHN_LONGBENCH, LONGBENCH_PROMPTS, LVEVAL_DATASETS


def test_english_normalisation_lower_punct_articles_whitespace():
    assert M.normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert M.normalize_answer("an apple\tand\na pear.") == "apple and pear"
    # Articles are whole words only: "theatre" and "another" keep their letters.
    assert M.normalize_answer("Theatre another") == "theatre another"


def test_chinese_normalisation_drops_chinese_punctuation_and_spaces():
    assert M.normalize_zh_answer("北京， 是 首都。ABC!") == "北京是首都abc"


def test_qa_f1_hand_computed():
    # pred {cat, sat} vs gt {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8.
    assert M.qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert M.qa_f1_score("PARIS!!", "paris") == 1.0
    # Multiset overlap: "cat cat" vs "cat" shares one token: P = 1/2, R = 1 -> 2/3.
    assert M.qa_f1_score("cat cat", "cat") == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction", ["", "   ", "the a an", "dog"])
def test_qa_f1_empty_or_no_overlap_is_zero(prediction):
    assert M.qa_f1_score(prediction, "a cat") == 0.0


def test_qa_f1_zh_characters():
    # pred chars 北京是首都 (5) vs gt 首都北京 (4): 4 shared -> P = 4/5, R = 1 -> 8/9.
    assert M.qa_f1_zh_score("北京，是首都。", "首都 北京") == pytest.approx(8 / 9)
    assert M.qa_f1_zh_score("", "北京") == 0.0
    assert M.qa_f1_zh_score("上海", "北京") == 0.0


def test_lcs_length():
    assert M.lcs_length("abcbdab", "bdcaba") == 4
    assert M.lcs_length([], [1, 2]) == 0


def test_rouge_l_hand_computed():
    # LCS(a b c d, a c d e) = 3 -> P = R = 3/4.
    assert M.rouge_score("a b c d", "a c d e") == pytest.approx(0.75)
    # LCS 2 of pred 4 / ref 2 tokens: P = 1/2, R = 1 -> 2/3; '.' is a separator, not a token.
    assert M.rouge_score("x. the cat y", "the cat.") == pytest.approx(2 / 3)
    assert M.rouge_score("A b", "a b") == pytest.approx(0.5)  # case kept, as the rouge package keeps it
    assert M.rouge_score("", "a b") == 0.0
    assert M.rouge_score("c d", "a b") == 0.0


def test_rouge_zh_characters():
    # LCS(今天天气很好, 今天很好) = 4: P = 4/6, R = 1 -> 0.8.
    assert M.rouge_zh_score("今天天气很好", "今天 很好") == pytest.approx(0.8)
    # Blacklist variant drops stop characters (的) and punctuation before the LCS: 我家猫 vs 我猫 -> P=2/3, R=1.
    assert M.rouge_zh_score_blacklist("我的家猫。", "我猫") == pytest.approx(0.8)


def test_classification():
    classes = ["sports", "sport", "news"]
    # "sport" is a substring of the true class and not a competing match; "news" competes: 1/2.
    assert M.classification_score("this is sports news", "sports", all_classes=classes) == 0.5
    assert M.classification_score("sports", "sports", all_classes=classes) == 1.0
    assert M.classification_score("weather", "sports", all_classes=classes) == 0.0
    assert M.classification_score("", "sports", all_classes=classes) == 0.0


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 3, or maybe 5", "Paragraph 3") == 0.5
    assert M.retrieval_score("no idea", "Paragraph 3") == 0.0
    assert M.retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers, not digits
    assert M.retrieval_zh_score("答案是段落12", "段落12") == 1.0
    assert M.count_score("There are 7 paragraphs, not 8", "7") == 0.5
    assert M.count_score("", "7") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        M.retrieval_score("1", "no paragraph id")


def test_code_sim_first_code_line():
    # The fence line holds '`' and is skipped; "x = foo(1)" vs "x = foo(2)": 9 of 10 chars match -> 2*9/20 = 0.9.
    assert M.code_sim_score("```python\nx = foo(1)\n```", "x = foo(2)") == pytest.approx(0.9)
    assert M.code_sim_score("# comment\nreturn y", "return y") == 1.0
    assert M.code_sim_score("", "return y") == 0.0


def test_keyword_gated_f1_en():
    # Keywords recalled (2/2): plain F1 of [eiffel, tower, in, paris] vs [eiffel, tower] = 2/3.
    assert M.qa_f1_score_with_gold_ans("The Eiffel Tower in Paris", "Eiffel Tower",
                                       answer_keywords="Eiffel Tower") == pytest.approx(2 / 3)
    # Overlap with the answer but no keyword recalled: gated to 0 (plain F1 would be 1/3).
    assert M.qa_f1_score("it is in Paris", "Paris, France") == pytest.approx(1 / 3)
    assert M.qa_f1_score_with_gold_ans("it is in Paris", "Paris, France", answer_keywords="Eiffel Tower") == 0.0
    # Recall exactly 0.2 (1 of 5 keywords) passes the gate.
    kw = "alpha beta gamma delta epsilon"
    assert M.qa_f1_score_with_gold_ans("alpha", "alpha", answer_keywords=kw) == 1.0
    assert M.qa_f1_score_with_gold_ans("zeta", "zeta", answer_keywords=kw) == 0.0
    # Stop words and articles leave the keyword list: only "paris" remains, and it is recalled.
    assert M.qa_f1_score_with_gold_ans("Paris", "Paris", answer_keywords="the of Paris") == 1.0
    assert M.qa_f1_score_with_gold_ans("", "Paris", answer_keywords="Paris") == 0.0


def test_keyword_gated_f1_zh_threshold():
    # Keywords 北京大学 (4 chars); 北京 recalls 0.5 >= 0.4 -> character F1 of 北京 vs 北京大学 = 2*(1*0.5)/1.5 = 2/3.
    assert M.qa_f1_zh_score_with_gold_ans("北京", "北京大学", answer_keywords="北京大学") == pytest.approx(2 / 3)
    # 北 alone recalls 0.25 < 0.4 -> 0 (its plain F1 would be 0.4).
    assert M.qa_f1_zh_score("北", "北京大学") == pytest.approx(0.4)
    assert M.qa_f1_zh_score_with_gold_ans("北", "北京大学", answer_keywords="北京大学") == 0.0


def test_metrics_stay_in_unit_interval_on_random_text():
    import random

    rng = random.Random(0)
    words = ["cat", "the", "dog", "Paris", "1", "2", "x", ",", "北京", "首都"]
    for _ in range(200):
        p = " ".join(rng.choices(words, k=rng.randint(0, 8)))
        g = " ".join(rng.choices(words, k=rng.randint(1, 8)))
        for metric in (M.qa_f1_score, M.qa_f1_zh_score, M.rouge_score, M.rouge_zh_score, M.code_sim_score,
                       M.count_score, M.qa_f1_score_with_gold_ans, M.qa_f1_zh_score_with_gold_ans):
            s = metric(p, g, answer_keywords=g)
            assert 0.0 <= s <= 1.0 + 1e-12, (metric.__name__, p, g, s)


def test_score_sample_rules():
    # triviaqa scores the first line; LV-Eval only the first reference; otherwise the best reference.
    assert M.score_sample(M.qa_f1_score, "\nParis\nLondon", ["London"], first_line=True) == 0.0
    assert M.score_sample(M.qa_f1_score, "\nParis\nLondon", ["Paris"], first_line=True) == 1.0
    assert M.score_sample(M.qa_f1_score, "y", ["x", "y"]) == 1.0
    assert M.score_sample(M.qa_f1_score, "y", ["x", "y"], first_reference_only=True) == 0.0
    assert M.mean_score([1.0, 0.5, 0.0]) == 50.0
    assert math.isnan(M.mean_score([]))


def test_metric_tables_cover_the_paper_datasets():
    for d in AHN_LONGBENCH:
        assert d in M.LONGBENCH_METRICS and d in LONGBENCH_PROMPTS
    assert set(M.LONGBENCH_METRICS) == set(LONGBENCH_PROMPTS)
    assert len(LVEVAL_DATASETS) == 11
    assert M.LONGBENCH_METRICS["dureader"] is M.rouge_zh_score
    assert M.LONGBENCH_METRICS["qmsum"] is M.rouge_score
    assert M.LVEVAL_METRICS["cmrc_mixup"] is M.qa_f1_zh_score_with_gold_ans
    assert M.LVEVAL_METRICS["dureader_mixup"] is M.rouge_zh_score_blacklist
