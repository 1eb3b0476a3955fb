"""Metric tests: hand-computed GLUE values, GSM8K answer extraction (and lm-evaluation-harness'
gsm8k filters pinned in tests/fixtures/parity/gsm8k_extraction.json), E2E NLG scores (and the
official E2E scorer pinned in tests/fixtures/parity/e2e_metrics.json)."""

from __future__ import annotations

import math
import shutil

import pytest

from lorabench.data.base import truncate_at_stops
from lorabench.data.gsm8k import STOP_STRINGS
from lorabench.evaluation import classification, data_to_text, math_answers
from tests.parity_case import load_fixture

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
        ("The answer is 3 * 4 = 12.", "12"),
        ("The answer is 2 * (3 + 4) = 14 apples, all red.", "14"),
        ("The answer is 20 (4 * 5).", "20"),
        ("The answer is 1,200, the total.", "1200"),
        ("The answer is below. 3 * 4 = 12", "12"),
        ("So it is \\boxed{1{,}500} people, 2 left", "1500"),
        ("\\boxed{\\frac{3}{4}} of 8 is 6", "6"),
        ("The answer is 6.\n\nQuestion: A farmer has 10 cows and 5 more?\nAnswer: 15", "6"),
        ("It took 3-4 hours", "4"),
        ("Total: 10 - 7", "7"),
        ("The phone costs $ 250.", "250"),
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
        ("$ 18", "18"),
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


def test_stop_strings_are_lm_eval_until():
    fixture = load_fixture("gsm8k_extraction")
    assert list(STOP_STRINGS) == fixture["settings"]["until"]
    text = "6 apples.\n#### 6\n\nQuestion: A new one?\nAnswer: 9<|im_end|>"
    assert truncate_at_stops(text, STOP_STRINGS) == "6 apples.\n#### 6\n\n"
    assert truncate_at_stops("no stop here", STOP_STRINGS) == "no stop here"


def _gsm8k_case_results():
    fixture = load_fixture("gsm8k_extraction")
    for case in fixture["cases"]:
        gold = math_answers.reference_answer(case["gold"])
        lm_right = case["lm_eval"]["strict-match"]["right"] or case["lm_eval"]["flexible-extract"]["right"]
        yield case, gold, lm_right


def test_extraction_is_right_wherever_lm_eval_gsm8k_is():
    """lm-eval 0.4.13's gsm8k pipeline (until, strict-match / flexible-extract, exact_match) on
    the pinned outputs: ours reads the answer the output states on every case, so it is right
    wherever either lm-eval filter is, and the cases where only ours is right are the pinned ones."""
    fixture = load_fixture("gsm8k_extraction")
    assert len(fixture["cases"]) >= 40
    ours_only, wrong = [], []
    for case, gold, lm_right in _gsm8k_case_results():
        for text in (case["output"], truncate_at_stops(case["output"], STOP_STRINGS)):
            ours = math_answers.extract_answer(text)
            assert ours == case["expected"], (case["id"], text, ours)
        right = ours is not None and ours == gold
        if lm_right and not right:
            wrong.append(case["id"])
        if right and not lm_right:
            ours_only.append(case["id"])
    assert not wrong, f"lm-eval right, ours wrong: {wrong}"
    assert ours_only == fixture["ours_right_lm_eval_wrong"]
    counts = fixture["right_counts"]
    assert counts["ours"] >= max(counts["strict-match"], counts["flexible-extract"])


def test_generation_stops_at_the_next_question():
    """A scripted model (a tiny Llama whose output head emits token k of a fixed continuation at
    step k): with the stop strings the generation ends at ``Question:`` (fewer steps than
    max_new_tokens) and the text is cut before it; without them it runs on."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorabench.config import DatasetConfig
    from lorabench.data.base import generate_texts
    from lorabench.models import RANDOM_MODELS

    config, tokenizer = RANDOM_MODELS.get("tiny_llama")()
    model = AutoModelForCausalLM.from_config(config).eval()
    continuation = "The answer is 4.\nQuestion: what next? #### 9 and many more words after it"
    script = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    steps = []

    def scripted(module, args, logits):
        forced = torch.full_like(logits, -1e9)
        forced[:, -1, script[min(len(steps), len(script) - 1)]] = 0.0
        steps.append(1)
        return forced

    model.lm_head.register_forward_hook(scripted)
    prompt = "Question: 2 + 2?\nAnswer:"
    cfg = DatasetConfig(name="gsm8k", max_new_tokens=len(script), eval_batch_size=1)
    [text] = generate_texts(model, tokenizer, [prompt], cfg, "cpu", stop=STOP_STRINGS)
    assert text.strip() == "The answer is 4."
    assert len(steps) < len(script)
    steps.clear()
    [full] = generate_texts(model, tokenizer, [prompt], cfg, "cpu")
    assert "Question:" in full and "#### 9" in full and len(steps) == len(script)


def test_batched_generation_returns_each_prompts_own_text_in_order():
    """Prompts are batched by length (longest first) with left padding: every text equals that
    prompt's generation alone (batch 1, no padding), greedy and beam, in the prompts' order."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorabench.config import DatasetConfig
    from lorabench.data.base import generate_texts
    from lorabench.models import RANDOM_MODELS

    config, tokenizer = RANDOM_MODELS.get("tiny_llama")()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = ["Question: 2 + 2?", "Question: a much longer question about trains leaving at noon?", "Q: 1?", "Hi"]
    for beams in (1, 3):
        alone = [
            generate_texts(model, tokenizer, [p], DatasetConfig(name="gsm8k", max_new_tokens=6, num_beams=beams,
                                                                eval_batch_size=1), "cpu")[0]
            for p in prompts
        ]  # fmt: skip
        cfg = DatasetConfig(name="gsm8k", max_new_tokens=6, num_beams=beams, eval_batch_size=3)
        assert generate_texts(model, tokenizer, prompts, cfg, "cpu") == alone
        assert len(set(alone)) > 1  # the texts differ, so an order mix-up would show


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
# the same texts as PTB tokens (what the jar returns for them)
MATCHING_TOK = ["near burger king is the eagle a cheap coffee shop", "cotto serves indian food in the city centre",
                "browns cambridge is a family-friendly pub by the river"]  # fmt: skip
MISMATCHING_TOK = ["a red car drove fast", "it rained all day long", "music plays loudly tonight"]
E2E_REFS_TOK = [
    ["the eagle is a cheap coffee shop near burger king", "near burger king is the eagle a cheap coffee shop"],
    ["cotto serves indian food in the city centre", "in the city centre cotto offers indian food"],
    ["browns cambridge is a family-friendly pub by the river", "by the river is browns cambridge a kids pub"],
]
# BLEU/NIST pinned from mteval prints 4 decimals: ours must round to the same value
MTEVAL_TOL = 5e-5 + 1e-9
needs_ptb_jar = pytest.mark.skipif(
    data_to_text.find_java() is None or data_to_text.find_ptb_jar() is None,
    reason="the PTB tokenizer needs java and pycocoevalcap's stanford-corenlp jar",
)


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(data_to_text, "find_java", lambda: None)


@pytest.fixture(scope="module")
def official():
    return load_fixture("e2e_metrics")


def test_mteval_tokenize_lowercases_ascii_only():
    assert data_to_text.mteval_tokenize("Éclair ÖL Café, £20-25 at 3.5/5 &amp; more.") == [
        "Éclair", "Öl", "café", ",", "£20", "-", "25", "at", "3.5", "/", "5", "&", "more", ".",
    ]  # fmt: skip


def test_bleu_nist_equal_the_official_scorer_on_the_hard_set(official):
    """mteval-v13a (tuetschek/e2e-metrics) on the pinned hard set, corpus and each output alone."""
    case = official["cases"]["hard"]
    hyps, refs = case["hypotheses"], case["references"]
    assert abs(data_to_text.bleu(hyps, refs) - case["official"]["bleu"]) <= MTEVAL_TOL
    assert abs(data_to_text.nist(hyps, refs) - case["official"]["nist"]) <= MTEVAL_TOL
    for hyp, group, pinned in zip(hyps, refs, case["official_mteval_per_output"]):
        assert abs(data_to_text.bleu([hyp], [group]) - pinned["BLEU"]) <= MTEVAL_TOL, hyp
        assert abs(data_to_text.nist([hyp], [group]) - pinned["NIST"]) <= MTEVAL_TOL, hyp


def test_rouge_l_cider_equal_the_official_scorer_on_its_tokens(official):
    """The official PTB tokens of the hard set in, the official ROUGE-L and CIDEr out (no java needed)."""
    case = official["cases"]["hard"]
    hyps, refs = case["official_ptb_hypotheses"], case["official_ptb_references"]
    assert data_to_text.rouge_l_tokenized(hyps, refs) == pytest.approx(case["official"]["rouge_l"], abs=1e-12)
    assert data_to_text.cider_tokenized(hyps, refs) == pytest.approx(case["official"]["cider"], abs=1e-12)
    segments = case["official_segments"]
    for i, (hyp, group) in enumerate(zip(hyps, refs)):
        assert data_to_text.rouge_l_tokenized([hyp], [group]) == pytest.approx(segments["rouge_l"][i], abs=1e-12)
    # CIDEr's idf is over the corpus, so per-output CIDEr needs the corpus: their mean is the score
    assert sum(segments["cider"]) / len(hyps) == pytest.approx(case["official"]["cider"], abs=1e-12)


def test_full_test_set_comparison_was_equal(official):
    """The parity script's record on the official E2E test set (630 MRs): all five equal to 4 decimals."""
    for name in ("test_perturbed", "test_hard", "test_heldout_hard"):
        record = official["comparison"][name]
        assert all(record["equal_to_4_decimals"].values()), (name, record["diff"])
    assert official["comparison"]["test_perturbed"]["outputs"] == 630
    assert official["comparison"]["test_perturbed"]["references"] == 4693


@needs_ptb_jar
def test_ptb_tokenize_is_the_official_tokenizer(official):
    case = official["cases"]["hard"]
    assert data_to_text.ptb_tokenize(case["hypotheses"]) == case["official_ptb_hypotheses"]
    flat = [ref for group in case["references"] for ref in group]
    assert data_to_text.ptb_tokenize(flat) == [ref for group in case["official_ptb_references"] for ref in group]
    # line breaks other than \n do not split a text (the jar would start a new line at each)
    assert data_to_text.ptb_tokenize(["a\rb\u2028c", "d"]) == ["a b c", "d"]


@pytest.mark.slow
def test_e2e_metrics_equal_the_official_scorer_on_the_hard_set(official):
    if data_to_text.find_java() is None or data_to_text.find_meteor_jar() is None:
        pytest.skip("METEOR needs java and pycocoevalcap's jar")
    case = official["cases"]["hard"]
    scores, missing = data_to_text.e2e_metrics(case["hypotheses"], case["references"])
    assert not missing
    for name in ("meteor", "rouge_l", "cider"):
        assert scores[name] == pytest.approx(case["official"][name], abs=1e-9), name
    for name in ("bleu", "nist"):
        assert abs(scores[name] - case["official"][name]) <= MTEVAL_TOL, name


def test_without_java_only_bleu_and_nist_are_scored(no_java):
    scores, missing = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    assert list(scores) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["nist"] > 0
    assert set(missing) == {"meteor", "rouge_l", "cider"}
    for name in missing:
        assert scores[name] is None and "java" in missing[name]


def test_missing_ptb_jar_is_reported(monkeypatch):
    monkeypatch.setattr(data_to_text, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(data_to_text, "find_ptb_jar", lambda: None)
    scores, missing = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    assert set(missing) == {"meteor", "rouge_l", "cider"}
    assert all("stanford-corenlp" in reason for reason in missing.values())
    assert scores["bleu"] == pytest.approx(1.0)


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


def test_bleu_smooths_orders_without_matches():
    # 3 unigrams match, no bigram/trigram: mteval's smoothing gives 1/2, 1/4 of the n-gram counts
    precisions = [3 / 3, 1 / (2 * 2), 1 / (4 * 1)]  # 4-grams: none in the output, counted as 1
    expected = math.exp(sum(math.log(p) for p in precisions) / 4)
    assert data_to_text.bleu(["c b a"], [["a b c"]]) == pytest.approx(expected)


def test_nist_hand_values():
    # info("a") = info("b") = log2(2/1) = 1, info("a b") = log2(1/1) = 0: (1 + 1) / 2 + 0 / 1
    assert data_to_text.nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # half the reference length: 1/1 times the length penalty exp(-beta * ln(1/2)^2)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert data_to_text.nist(["a"], [["a b"]]) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))
    # as in mteval's Perl, the prefix "0" reads as no prefix: info("0 b") = log2(2 words / 1)
    assert data_to_text.nist(["0 b"], [["0 b"]]) == pytest.approx((1 + 1) / 2 + 1 / 1)


def test_rouge_l_uses_best_precision_and_best_recall_over_references():
    assert data_to_text.rouge_l_tokenized(["the cat sat"], [["the cat sat"]]) == pytest.approx(1.0)
    # precision 1 from the long reference, recall 1 from the short one
    assert data_to_text.rouge_l_tokenized(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(1.0)
    # LCS "a c d": P = 3/4, R = 3/5, F with beta 1.2
    p, r = 3 / 4, 3 / 5
    expected = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    assert data_to_text.rouge_l_tokenized(["a b c d"], [["a c d e f"]]) == pytest.approx(expected)


def test_cider_rewards_matching_outputs():
    matching = data_to_text.cider_tokenized(MATCHING_TOK, E2E_REFS_TOK)
    mismatching = data_to_text.cider_tokenized(MISMATCHING_TOK, E2E_REFS_TOK)
    assert matching > 1.0
    assert 0 <= mismatching < 0.1 * matching


def test_e2e_lower_scores_for_mismatching_outputs(no_java):
    good, _ = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    bad, _ = data_to_text.e2e_metrics(MISMATCHING, E2E_REFS)
    for name in ("bleu", "nist"):
        assert bad[name] < good[name], name
    assert data_to_text.rouge_l_tokenized(MISMATCHING_TOK, E2E_REFS_TOK) < data_to_text.rouge_l_tokenized(
        MATCHING_TOK, E2E_REFS_TOK
    )


def test_missing_meteor_jar_is_reported(monkeypatch):
    monkeypatch.setattr(data_to_text, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(data_to_text, "find_meteor_jar", lambda: None)
    with pytest.raises(data_to_text.MetricUnavailable, match="pycocoevalcap"):
        data_to_text.meteor(MATCHING, E2E_REFS)
    with pytest.raises(data_to_text.MetricUnavailable, match="pycocoevalcap"):
        data_to_text.meteor_tokenized(MATCHING_TOK, E2E_REFS_TOK)


def test_failing_java_is_reported(monkeypatch, tmp_path):
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` executable")
    monkeypatch.setattr(data_to_text, "find_java", lambda: failing)
    monkeypatch.setattr(data_to_text, "find_meteor_jar", lambda: tmp_path / "meteor-1.5.jar")
    monkeypatch.setattr(data_to_text, "find_ptb_jar", lambda: tmp_path / "stanford-corenlp-3.4.1.jar")
    scores, missing = data_to_text.e2e_metrics(MATCHING, E2E_REFS)
    assert scores["meteor"] is None and scores["rouge_l"] is None
    assert "PTB tokenizer failed" in missing["meteor"]
    with pytest.raises(data_to_text.MetricUnavailable, match="METEOR"):
        data_to_text.meteor_tokenized(MATCHING_TOK, E2E_REFS_TOK)


def test_e2e_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 hypotheses"):
        data_to_text.e2e_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        data_to_text.e2e_metrics(["a"], [[]])


@pytest.mark.slow
def test_meteor_with_the_official_jar(official):
    if data_to_text.find_java() is None or data_to_text.find_meteor_jar() is None:
        pytest.skip("METEOR needs java and pycocoevalcap's jar")
    matching = data_to_text.meteor_tokenized(MATCHING_TOK, E2E_REFS_TOK)
    assert 0.9 < matching <= 1.0
    assert data_to_text.meteor_tokenized(MISMATCHING_TOK, E2E_REFS_TOK) < matching
    case = official["cases"]["hard"]
    pinned = data_to_text.meteor_tokenized(case["official_ptb_hypotheses"], case["official_ptb_references"])
    assert pinned == pytest.approx(case["official"]["meteor"], abs=1e-9)
