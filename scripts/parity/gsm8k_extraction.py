"""`.venv/bin/python scripts/parity/gsm8k_extraction.py`

Runs lm-evaluation-harness' ``gsm8k`` answer pipeline and lorabench's
``evaluation.math_answers.extract_answer`` on the same model outputs and writes
tests/fixtures/parity/gsm8k_extraction.json.

Reference: pip lm-eval==0.4.13, installed outside the project venv:

    .venv/bin/pip install --no-deps --target /tmp/parity/lm-eval/site lm-eval==0.4.13

(another folder: PARITY_LM_EVAL_SITE=...). Its pipeline, read from its ``tasks/gsm8k/gsm8k.yaml``:
the generation is cut at the first of the ``until`` strings (``models.utils.postprocess_generated_text``),
then each filter of ``filter_list`` runs (``filters.extraction.RegexFilter``, ``filters.selection.
TakeFirstFilter``): "strict-match" (the first ``#### N``) and "flexible-extract" (the last
number-like string), and ``api.metrics.exact_match_hf_evaluate`` with the yaml's metric options
compares the result with the reference solution.

Each case is a model output written to probe one difficulty (arithmetic after the answer phrase,
decimals, ``$``, thousands commas, negative results, ``\\boxed{}``, ``####``, rambling on into a new
question, no number, ...), its reference solution (``#### N``) and ``expected``: the final answer
the output states in digits (None when it states none). The fixture keeps lm-eval's extracted
strings and verdicts per filter, and the cases where lorabench is right and neither lm-eval filter is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SITE = Path(os.environ.get("PARITY_LM_EVAL_SITE", "/tmp/parity/lm-eval/site"))
VERSION = "0.4.13"

# (id, model output, reference solution, expected final answer or None)
CASES = [
    ("marker", "48/2 = 24 clips in May.\n48+24 = 72 clips in all.\n#### 72", "#### 72", "72"),
    ("phrase_plain", "She has 5 + 3 = 8 apples. The answer is 8.", "#### 8", "8"),
    ("phrase_then_arithmetic", "The answer is 3 * 4 = 12.", "#### 12", "12"),
    ("phrase_arithmetic_units", "The answer is 5 + 7 = 12 dollars, which he spends.", "#### 12", "12"),
    ("phrase_parenthesised_calc", "The answer is 2 * (3 + 4) = 14.", "#### 14", "14"),
    ("phrase_then_check", "The answer is 42. Then we add 3 more to check.", "#### 42", "42"),
    ("phrase_with_explanation", "The answer is 20 (4 * 5).", "#### 20", "20"),
    ("phrase_then_conversion", "The answer is 60 minutes, i.e. 1 hour.", "#### 60", "60"),
    ("phrase_bold", "So the final ANSWER IS: **19**", "#### 19", "19"),
    ("phrase_colon", "Cost per item 5, 3 items. Answer: 15", "#### 15", "15"),
    ("self_correction", "The answer is 5. Wait, recheck: the answer is 6.", "#### 6", "6"),
    ("phrase_no_number", "The answer is below. 3 * 4 = 12", "#### 12", "12"),
    ("marker_commas", "#### 1,234", "#### 1234", "1234"),
    ("marker_dollar", "He pays 4 * 10 = 40 dollars.\n#### $40", "#### 40", "40"),
    ("marker_trailing_period", "#### 40.", "#### 40", "40"),
    ("marker_negative", "5 - 8 = -3\n#### -3", "#### -3", "-3"),
    ("marker_decimal_zeros", "#### 1,234.00", "#### 1234", "1234"),
    ("marker_first_of_two", "#### 72\n#### 80", "#### 72", "72"),
    (
        "marker_then_ramble",
        "10 + 20 = 30 and 30 * 2 = 60\n#### 60\nQuestion: Tom has 7 cats.\nAnswer: #### 7",
        "#### 60",
        "60",
    ),
    ("dollars_decimal", "The total cost is $18.00.", "#### 18", "18"),
    ("dollars_cents", "She paid $1,234.50 in total.", "#### 1234.5", "1234.5"),
    ("dollars_last", "Each costs $3.50, so 2 cost $7.", "#### 7", "7"),
    ("dollars_space", "The phone costs $ 250.", "#### 250", "250"),
    ("thousands", "He earns $1,000 a week, so in 4 weeks 4 * 1,000 = $4,000.", "#### 4000", "4000"),
    ("millions", "The answer is 1,200,000.", "#### 1200000", "1200000"),
    ("decimal_answer", "The average is 2.5 hours.\n#### 2.5", "#### 2.5", "2.5"),
    ("decimal_trailing_zero", "Each share is 2.50 dollars.", "#### 2.5", "2.5"),
    ("leading_point", "Pour .5 cups", "#### 0.5", "0.5"),
    ("negative_phrase", "He ends up owing money, so the answer is -7.", "#### -7", "-7"),
    ("negative_unicode_minus", "x = \u22125", "#### -5", "-5"),
    ("negative_result_eq", "The difference is 5 - 8 = -3.", "#### -3", "-3"),
    ("range_not_negative", "It took 3-4 hours", "#### 4", "4"),
    ("subtraction_spaced", "Total: 10 - 7", "#### 7", "7"),
    ("zero", "All cookies are eaten, the answer is 0.", "#### 0", "0"),
    ("boxed", "\\boxed{15}", "#### 15", "15"),
    ("boxed_commas", "So the answer is \\boxed{1,000}.", "#### 1000", "1000"),
    ("boxed_then_check", "The final answer is \\boxed{12}. Check: 3 * 4 = 12 and 12 / 2 = 6", "#### 12", "12"),
    ("boxed_dollar", "Therefore \\boxed{\\$18}", "#### 18", "18"),
    ("boxed_negative", "The answer is \\(\\boxed{-4}\\)", "#### -4", "-4"),
    ("boxed_text", "\\boxed{12 \\text{ apples}} in the basket, 3 of them red", "#### 12", "12"),
    ("boxed_latex_comma", "\\boxed{1{,}500} people came, 2 left", "#### 1500", "1500"),
    (
        "ramble_after_phrase",
        "She has 6 apples. The answer is 6.\n\nQuestion: A farmer has 10 cows and buys 5 more. "
        "How many cows?\nAnswer: 10 + 5 = 15",
        "#### 6",
        "6",
    ),
    (
        "ramble_no_phrase",
        "16 - 3 - 4 = 9 eggs, sold at $2 each: 9 * 2 = 18\n\nQuestion: Sam has 3 pens and 4 more. "
        "How many pens?\nAnswer: 3 + 4 = 7",
        "#### 18",
        "18",
    ),
    (
        "ramble_marker_in_new_question",
        "The answer is 7.\nQuestion: Ann has 2 dogs. How many legs?\nAnswer: 2 * 4 = 8\n#### 8",
        "#### 7",
        "7",
    ),
    ("last_number", "There are 7 days in a week, so 3 weeks have 21 days.", "#### 21", "21"),
    ("negative_last", "He is 5 dollars short, so his balance is -5 dollars.", "#### -5", "-5"),
    ("percent_phrase", "The discount is 25%, so the answer is 25", "#### 25", "25"),
    ("time_colon", "The train leaves at 3:30, so she waits 30 minutes. The answer is 30.", "#### 30", "30"),
    ("wrong_model_answer", "5 + 3 = 9\n#### 9", "#### 8", "9"),
    ("truncated_reasoning", "First, 16 - 3 = 13. Then 13 - 4", "#### 9", "4"),
    ("words_only", "The answer is twelve.", "#### 12", None),
    ("no_number", "I don't know how to solve this.", "#### 5", None),
    ("empty", "", "#### 5", None),
]


def reference():
    if not (SITE / "lm_eval").is_dir():
        sys.exit(
            f"lm-eval {VERSION} not found under {SITE}; install it with\n"
            f"  .venv/bin/pip install --no-deps --target {SITE} lm-eval=={VERSION}"
        )
    sys.path.insert(0, str(SITE))
    import lm_eval

    assert Path(lm_eval.__file__).resolve().is_relative_to(SITE.resolve()), lm_eval.__file__
    return lm_eval


def lm_eval_pipeline():
    """lm-eval's gsm8k task pieces, from its yaml: until, filters, exact-match options."""
    lm_eval = reference()
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter
    from lm_eval.models.utils import postprocess_generated_text

    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    until = task["generation_kwargs"]["until"]
    metric = next(m for m in task["metric_list"] if m["metric"] == "exact_match")
    options = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    filters = {}
    for entry in task["filter_list"]:
        steps = []
        for step in entry["filter"]:
            if step["function"] == "regex":
                kwargs = {k: step[k] for k in ("regex_pattern", "group_select") if k in step}
                steps.append(RegexFilter(**kwargs))
            elif step["function"] == "take_first":
                steps.append(TakeFirstFilter())
            else:
                raise SystemExit(f"unexpected filter {step['function']!r} in gsm8k.yaml")
        filters[entry["name"]] = steps

    def run(output: str, gold: str) -> dict:
        text = postprocess_generated_text(generation=output, stop=until, think_end_token=None)
        result = {"generation": text}
        for name, steps in filters.items():
            responses = [[text]]
            for step in steps:
                responses = list(step.apply(responses, [None]))
            answer = responses[0]
            verdict = exact_match_hf_evaluate(predictions=[answer], references=[gold], **options)["exact_match"]
            result[name] = {"answer": answer, "right": bool(verdict == 1.0)}
        return result

    return run, until, options, task["filter_list"]


def main() -> None:
    from lorabench.data.base import truncate_at_stops
    from lorabench.data.gsm8k import STOP_STRINGS
    from lorabench.evaluation.math_answers import extract_answer, normalize_number, reference_answer
    from tests.parity_case import write_fixture

    if len(CASES) < 40 or len({c[0] for c in CASES}) != len(CASES):
        sys.exit("need >= 40 cases with distinct ids")
    run, until, options, filter_list = lm_eval_pipeline()
    cases, counts, ours_only = [], {"ours": 0, "strict-match": 0, "flexible-extract": 0}, []
    for case_id, output, gold, expected in CASES:
        lm = run(output, gold)
        ours = extract_answer(truncate_at_stops(output, STOP_STRINGS))
        if ours != expected:
            print(f"note: ours {ours!r} != expected {expected!r} on {case_id}", file=sys.stderr)
        ours_right = ours is not None and ours == normalize_number(reference_answer(gold))
        counts["ours"] += ours_right
        for name in ("strict-match", "flexible-extract"):
            counts[name] += lm[name]["right"]
        if ours_right and not (lm["strict-match"]["right"] or lm["flexible-extract"]["right"]):
            ours_only.append(case_id)
        if not ours_right and (lm["strict-match"]["right"] or lm["flexible-extract"]["right"]):
            print(f"WARNING: lm-eval right and ours wrong on {case_id}: ours {ours!r}, lm-eval {lm}", file=sys.stderr)
        cases.append({"id": case_id, "output": output, "gold": gold, "expected": expected, "lm_eval": lm})
    print(f"right out of {len(CASES)}: {counts}; ours right where lm-eval is not: {ours_only}")
    write_fixture(
        "gsm8k_extraction",
        {
            "reference": f"pip lm-eval=={VERSION} tasks/gsm8k/gsm8k.yaml (filters strict-match, flexible-extract)",
            "version": VERSION,
            "produced_by": "scripts/parity/gsm8k_extraction.py",
            "settings": {"until": until, "exact_match": options, "filter_list": filter_list},
            "cases": cases,
            "right_counts": {**counts, "n": len(CASES)},
            "ours_right_lm_eval_wrong": ours_only,
        },
    )


if __name__ == "__main__":
    main()
