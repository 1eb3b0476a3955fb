"""GSM8K answer handling (Cobbe et al., 2021): the metric is exact match of the final number.

A GSM8K reference solution ends with ``#### <answer>``. A model's answer is read from its generated
text by :func:`extract_answer` and both sides are compared in the canonical form of
:func:`normalize_number`, so ``$1,234.50`` matches ``1234.5`` and ``4.0`` matches ``4``.
Fractions (``3/4``) are not interpreted: GSM8K answers are integers.
"""

from __future__ import annotations

import re
from decimal import Decimal

# A number as written in text: optional minus (ASCII or U+2212) and "$", thousands commas, decimals.
# The minus must not follow a word character, so ranges like "3-4" do not yield "-4".
_NUMBER = r"(?:(?<![\w)])[-\u2212])?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_PHRASE_RE = re.compile(r"answer\s*(?:is|:|=)[\s:*]*(" + _NUMBER + ")", re.IGNORECASE)
_CANONICAL_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_number(s: str) -> str | None:
    """Canonical form of a number, or None if ``s`` is not one.

    Rule: strip surrounding spaces, ``$``, thousands commas and a trailing period, read U+2212 as
    ``-``; then integral values print as integers (``4.0`` -> ``4``, ``-0`` -> ``0``) and decimals
    lose trailing zeros (``3.50`` -> ``3.5``).
    """
    text = s.strip().replace("\u2212", "-").replace("$", "").replace(",", "").rstrip(".")
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


def extract_answer(generated: str) -> str | None:
    """The final number a model produced, in canonical form, or None if the text has no number.

    Rule, first that applies: the number after the first ``####`` marker (the GSM8K format; text a
    model rambles on with after it is ignored); the number after the last "answer is" / "answer:"
    phrase (case-insensitive, so a self-correction wins); the last number anywhere in the text.
    """
    marker = _MARKER_RE.search(generated)
    if marker:
        return normalize_number(marker.group(1))
    phrases = _PHRASE_RE.findall(generated)
    if phrases:
        return normalize_number(phrases[-1])
    numbers = _NUMBER_RE.findall(generated)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(generated: str, reference: str) -> bool:
    """True when the number extracted from ``generated`` equals the reference number canonically."""
    predicted = extract_answer(generated)
    return predicted is not None and predicted == normalize_number(reference)
