"""GSM8K answer handling (Cobbe et al., 2021): the metric is exact match of the final number.

A GSM8K reference solution ends with ``#### <answer>``. A model's answer is read from its generated
text by :func:`extract_answer` and both sides are compared in the canonical form of
:func:`normalize_number`, so ``$1,234.50`` matches ``1234.5`` and ``4.0`` matches ``4``.
Fractions (``3/4``) are not interpreted: GSM8K answers are integers.

The extraction is checked against lm-evaluation-harness' ``gsm8k`` filters ("strict-match":
the first ``#### N``; "flexible-extract": the last number-like string) by
``scripts/parity/gsm8k_extraction.py`` (fixture ``tests/fixtures/parity/gsm8k_extraction.json``):
on every output there that either filter gets right, :func:`extract_answer` is right too.
"""

from __future__ import annotations

import re
from decimal import Decimal

# The next-question marker of the "plain" prompt (``Question: ...\nAnswer:``): text from it on is a
# new problem the model made up, as lm-evaluation-harness' ``until`` treats it.
NEXT_QUESTION = "Question:"

# A number as written in text: optional minus (ASCII or U+2212) and "$" (maybe followed by a space),
# thousands commas, decimals.
# The minus must not follow a word character, so ranges like "3-4" do not yield "-4".
_NUMBER = r"(?:(?<![\w)])[-\u2212])?(?:\$ ?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\d.])\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_PHRASE_RE = re.compile(r"\banswer\s*(?:is|:|=)[\s:*]*", re.IGNORECASE)
# The answer phrase's clause ends at a sentence or clause mark followed by space (or the end),
# or at a line break; a decimal point or thousands comma does not end it.
_CLAUSE_END_RE = re.compile(r"[.!?;,](?=\s|$)|\n")
_CANONICAL_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_number(s: str) -> str | None:
    """Canonical form of a number, or None if ``s`` is not one.

    Rule: strip surrounding spaces, ``$``, thousands commas and a trailing period, read U+2212 as
    ``-``; then integral values print as integers (``4.0`` -> ``4``, ``-0`` -> ``0``) and decimals
    lose trailing zeros (``3.50`` -> ``3.5``).
    """
    text = s.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not _CANONICAL_RE.fullmatch(text):
        return None
    value = Decimal(text)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def reference_answer(answer_field: str) -> str:
    """The canonical number after ``#### `` in an official GSM8K ``answer`` field.

    Raises ValueError when the field has no ``#### <number>`` line.
    """
    _, marker, tail = answer_field.rpartition("####")
    number = normalize_number(tail) if marker else None
    if number is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-80:]!r}")
    return number


def _phrase_answer(clause: str) -> str | None:
    """The number an answer phrase's clause states: after its last ``=`` when the clause is a
    calculation (``3 * 4 = 12`` -> 12), else its first number (``12 (3 * 4)`` -> 12)."""
    _, equals, result = clause.rpartition("=")
    for text in (result, clause) if equals else (clause,):
        number = _NUMBER_RE.search(text)
        if number:
            return number.group(0)
    return None


def extract_answer(generated: str) -> str | None:
    """The final number a model produced, in canonical form, or None if the text has no number.

    Only the text before the first ``Question:`` counts (a model rambling on into a new problem).
    Rule, first that applies: the number after the first ``####`` marker (the GSM8K format; what
    follows it is ignored); the number in the last ``\\boxed{...}``; the number stated by the last
    "answer is" / "answer:" phrase (case-insensitive, so a self-correction wins), read from the
    phrase's clause by :func:`_phrase_answer`; the last number anywhere in the text.
    """
    text = generated.split(NEXT_QUESTION, 1)[0]
    marker = _MARKER_RE.search(text)
    if marker:
        return normalize_number(marker.group(1))
    for boxed in reversed(_BOXED_RE.findall(text)):
        if "\\frac" in boxed or "/" in boxed:
            continue  # a fraction is not read as its numerator
        number = _NUMBER_RE.search(boxed.replace("\\$", "$").replace("\\!", "").replace("{,}", ","))
        if number:
            return normalize_number(number.group(0))
    for phrase in reversed(list(_PHRASE_RE.finditer(text))):
        rest = text[phrase.end() :]
        end = _CLAUSE_END_RE.search(rest)
        number = _phrase_answer(rest[: end.start()] if end else rest)
        if number is not None:
            return normalize_number(number)
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(generated: str, reference: str) -> bool:
    """True when the number extracted from ``generated`` equals the reference number canonically."""
    predicted = extract_answer(generated)
    return predicted is not None and predicted == normalize_number(reference)
