"""Metric tests: hand-computed GLUE values, GSM8K answer extraction, E2E NLG scores."""

from __future__ import annotations

import math
import shutil

import pytest

from lorabench.evaluation import classification, data_to_text, math_answers

# --- GLUE -----------------------------------------------------------------------------------------

# TP=3, TN=2, FP=1, FN=0
CONFUSION_PREDS = [1, 1, 1, 1, 0, 0]
CONFUSION_REFS = [1, 1, 1, 0, 0, 0]


def test_matthews_correlation_matches_hand_formula():
    tp, tn, fp, fn = 3, 2, 1, 0
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    value = classification.METRICS["matthews_correlation"](CONFUSION_PREDS, CONFUSION_REFS)
    assert value == pytest.approx(expected)
    assert value == pytest.approx(1 / math.sqrt(2))


def test_accuracy_and_f1_hand_values():
    scores = classification.compute(["accuracy", "f1"], CONFUSION_PREDS, CONFUSION_REFS)
    assert scores["accuracy"] == pytest.approx(5 / 6)
    precision, recall = 3 / 4, 3 / 3
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert all(type(value) is float for value in scores.values())


def test_f1_positive_class_is_one():
    # Every 0 is right, no 1 is: F1 of class 1 is 0 although accuracy is 2/3.
    assert classification.compute(["f1"], [0, 0, 0], [0, 0, 1])["f1"] == 0.0


def test_pearson_perfect_and_known_anticorrelation():
    x = [1.0, 2.0, 3.0, 4.0]
    assert classification.compute(["pearson"], x, [2 * v + 3 for v in x])["pearson"] == pytest.approx(1.0)
    # deviations (-1, 0, 1) and (0, 1, -1): cov -1, variances 2 and 2, so r = -1/2
    assert classification.compute(["pearson"], [1, 2, 3], [2, 3, 1])["pearson"] == pytest.approx(-0.5)


def test_spearman_is_one_on_monotone_nonlinear_relation():
    x = [0.5, 1.0, 2.0, 3.0, 5.0]
    cubes = [v**3 for v in x]
    scores = classification.compute(["spearmanr", "pearson"], x, cubes)
    assert scores["spearmanr"] == pytest.approx(1.0)
    assert scores["pearson"] < 0.99


def test_unknown_metric_names_it_and_the_choices():
    with pytest.raises(ValueError, match="bleurt") as excinfo:
        classification.compute(["accuracy", "bleurt"], [1], [1])
    for name in classification.METRICS:
        assert name in str(excinfo.value)


# --- GSM8K ----------------------------------------------------------------------------------------

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("#### 1,234", "1234"),
        ("The answer is $18.00.", "18"),
        ("She eats 3 and bakes 4, so she has 5 apples left.", "5"),
        ("The temperature dropped to -7 degrees.", "-7"),
        ("Each costs 3.50", "3.5"),
        ("It weighs 4.0 kg.", "4"),
        ("12 dollars.", "12"),
        ("10 + 20 = 30 and 30 * 2 = 60\n#### 60\nQuestion: Tom has 7 cats", "60"),
        ("First 5, then 8, #### 13 and later 99", "13"),
        ("The answer is 42. Then we add 3 more.", "42"),
        ("answer: 7 apples", "7"),
        ("The final ANSWER IS: **19**", "19"),
        ("The answer is 5. Wait, recheck: the answer is 6.", "6"),
        ("It took 3-4 hours", "4"),
        ("Total: 10 - 7", "7"),
        ("She paid $1,000,000.50 in total.", "1000000.5"),
        ("x = \u22125", "-5"),
        ("Pour .5 cups", "0.5"),
        ("There is no number here.", None),
        ("", None),
    ],
)
def test_extract_answer(generated, expected):
    assert math_answers.extract_answer(generated) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", "1234"),
        ("$18.00", "18"),
        ("3.50", "3.5"),
        ("-0", "0"),
        ("12.", "12"),
        ("abc", None),
        ("", None),
    ],
)
def test_normalize_number(text, expected):
    assert math_answers.normalize_number(text) == expected


def test_reference_answer_reads_the_official_format():
    assert math_answers.reference_answer(GSM8K_ANSWER) == "72"
    assert math_answers.reference_answer("so 1000 in all\n#### 1,000") == "1000"
    with pytest.raises(ValueError, match="####"):
        math_answers.reference_answer("Natalia sold 72 clips.")


def test_exact_match():
    reference = math_answers.reference_answer(GSM8K_ANSWER)
    assert math_answers.exact_match("In total she sold 72.00 clips.", reference)
    assert math_answers.exact_match("The answer is $3.50", "3.5")
    assert not math_answers.exact_match("She sold 71 clips.", reference)
    assert not math_answers.exact_match("I don't know.", reference)


# --- E2E NLG --------------------------------------------------------------------------------------

E2E_REFS = [
    [
        "The Eagle is a cheap coffee shop near Burger King.",
        "Near Burger King is The Eagle, a cheap coffee shop.",
    ],
    ["Cotto serves Indian food in the city centre.", "In the city centre, Cotto offers Indian food."],
    [
        "Browns Cambridge is a family-friendly pub by the river.",
        "By the river is Browns Cambridge, a kids' pub.",
    ],
]
MATCHING = ["Near Burger King is The Eagle, a cheap coffee shop.", E2E_REFS[1][0], E2E_REFS[2][0]]
MISMATCHING = ["A red car drove fast.", "It rained all day long.", "Music plays loudly tonight."]


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(data_to_text, "find_java", lambda: None)


def test_ptb_tokenize_follows_the_official_tokens():
    tokens = data_to_text.ptb_tokenize("The Eagle isn't cheap: it's £20-25 (high), e.g. at 3.5/5!")
    assert tokens == [
        "the", "eagle", "is", "n't", "cheap", "it", "'s", "£", "20-25", "-lrb-", "high", "-rrb-",
        "e.g.", "at", "3.5", "/", "5",
    ]  # fmt: skip


def test_e2e_scores_are_perfect_when_each_output_is_a_reference(no_java):
    scores, missing = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    assert list(scores) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["nist"] > 0
    assert scores["cider"] > 0
    assert scores["meteor"] is None and "java" in missing["meteor"]
    assert set(missing) == {"meteor"}


def test_multi_reference_bleu_beats_single_reference():
    hyps = ["the cat sat on the red mat", "a dog ran in the green park"]
    first = [["the cat sat on the mat"], ["a dog ran in the park"]]
    extra = [["there is a cat on the red mat"], ["the dog was in the green park"]]
    single = data_to_text.bleu(hyps, first)
    multi = data_to_text.bleu(hyps, [a + b for a, b in zip(first, extra)])
    assert 0 < single < multi < 1


def test_bleu_handles_different_numbers_of_references():
    refs = [["the cat sat on the mat", "a cat was sitting on the mat", "on the mat sat a cat"], ["a dog ran"]]
    assert data_to_text.bleu(["the cat sat on the mat", "a dog ran"], refs) == pytest.approx(1.0)


def test_nist_hand_values():
    # info("a") = info("b") = log2(2/1) = 1, info("a b") = log2(1/1) = 0: (1 + 1) / 2 + 0 / 1
    assert data_to_text.nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # half the reference length: 1/1 times the length penalty exp(-beta * ln(1/2)^2)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert data_to_text.nist(["a"], [["a b"]]) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))


def test_rouge_l_uses_best_precision_and_best_recall_over_references():
    assert data_to_text.rouge_l(["The cat sat."], [["the cat sat"]]) == pytest.approx(1.0)
    # precision 1 from the long reference, recall 1 from the short one
    assert data_to_text.rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(1.0)
    # LCS "a c d": P = 3/4, R = 3/5, F with beta 1.2
    p, r = 3 / 4, 3 / 5
    expected = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    assert data_to_text.rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx(expected)


def test_cider_rewards_matching_outputs():
    matching = data_to_text.cider(MATCHING, E2E_REFS)
    mismatching = data_to_text.cider(MISMATCHING, E2E_REFS)
    assert matching > 1.0
    assert 0 <= mismatching < 0.1 * matching


def test_e2e_lower_scores_for_mismatching_outputs(no_java):
    good, _ = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    bad, _ = data_to_text.e2e_metrics(MISMATCHING, E2E_REFS)
    for name in ("bleu", "nist", "rouge_l", "cider"):
        assert bad[name] < good[name], name


def test_missing_meteor_jar_is_reported(monkeypatch):
    monkeypatch.setattr(data_to_text, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(data_to_text, "find_meteor_jar", lambda: None)
    scores, missing = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    assert scores["meteor"] is None
    assert "pycocoevalcap" in missing["meteor"]


def test_failing_meteor_process_is_reported(monkeypatch, tmp_path):
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` executable")
    monkeypatch.setattr(data_to_text, "find_java", lambda: failing)
    monkeypatch.setattr(data_to_text, "find_meteor_jar", lambda: tmp_path / "meteor-1.5.jar")
    scores, missing = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    assert scores["meteor"] is None
    assert "METEOR" in missing["meteor"]


def test_e2e_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 hypotheses"):
        data_to_text.e2e_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        data_to_text.e2e_metrics(["a"], [[]])


@pytest.mark.slow
def test_meteor_with_the_official_jar():
    if data_to_text.find_java() is None or data_to_text.find_meteor_jar() is None:
        pytest.skip("METEOR needs java and pycocoevalcap's jar")
    matching = data_to_text.meteor(MATCHING, E2E_REFS)
    assert 0.9 < matching <= 1.0
    assert data_to_text.meteor(MISMATCHING, E2E_REFS) < matching
