"""GLUE metrics (Wang et al., 2019), as named by the GLUE tasks.

Every metric takes ``(predictions, references)`` and returns a plain Python float: accuracy and F1 as
fractions in 0..1, the correlations in -1..1. F1 is binary with class 1 positive (MRPC, QQP);
Matthews correlation is the official CoLA metric; Pearson and Spearman correlations are STS-B's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lorabench.errors import ConfigError


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference label."""
    return float(accuracy_score(references, predictions))


def f1(predictions: Sequence, references: Sequence) -> float:
    """Binary F1 of the positive class 1: 2PR / (P + R) (0.0 when there are no positives at all)."""
    return float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation coefficient, the official GLUE CoLA metric (0.0 when undefined)."""
    return float(matthews_corrcoef(references, predictions))


def pearson(predictions: Sequence, references: Sequence) -> float:
    """Pearson linear correlation (GLUE STS-B)."""
    return float(pearsonr(predictions, references)[0])


def spearman(predictions: Sequence, references: Sequence) -> float:
    """Spearman rank correlation (GLUE STS-B)."""
    return float(spearmanr(predictions, references)[0])


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def compute(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Compute the named metrics; an unknown name raises ``ConfigError`` (a ``ValueError``)."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; valid choices: {', '.join(sorted(METRICS))}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return {name: METRICS[name](predictions, references) for name in names}
