"""The continual-learning summary of an accuracy matrix (torch-free).

``R[i][j]`` is the primary metric of task ``j`` evaluated after training stage ``i`` (None for
``j > i``: a task not trained yet is not evaluated). With ``T`` stages:

* average accuracy ACC = mean_j R[T-1][j] (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory
  for Continual Learning", arXiv:1706.08840, Eq. 2);
* backward transfer BWT = mean_{j < T-1} (R[T-1][j] - R[j][j]) (ibid.): negative is forgetting;
* forgetting F = mean_{j < T-1} (max_{j <= i < T-1} R[i][j] - R[T-1][j]) (Chaudhry et al., 2018,
  "Riemannian Walk for Incremental Learning", arXiv:1801.10112, Eq. 6).

BWT and F need at least two stages; with one they are None.
"""

from __future__ import annotations

from statistics import fmean


def accuracy_matrix(stages: list[dict], tasks: list[str], primaries: dict[str, str]) -> list[list[float | None]]:
    """``R`` from the stages' scores: row i = stage i, column j = task j's primary metric."""
    return [
        [stage["scores"][task][primaries[task]] if task in stage["scores"] else None for task in tasks]
        for stage in stages
    ]


def average_accuracy(matrix: list[list[float | None]]) -> float | None:
    """Mean of the last row over the tasks trained so far."""
    if not matrix:
        return None
    last = [v for v in matrix[-1] if v is not None]
    return fmean(last) if last else None


def backward_transfer(matrix: list[list[float | None]]) -> float | None:
    """Mean over the earlier tasks of (final score - score right after its own stage)."""
    last = len(matrix) - 1
    if last < 1:
        return None
    return fmean(matrix[last][j] - matrix[j][j] for j in range(last))


def forgetting(matrix: list[list[float | None]]) -> float | None:
    """Mean over the earlier tasks of (best score before the last stage - final score)."""
    last = len(matrix) - 1
    if last < 1:
        return None
    return fmean(max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last))


def summary(stages: list[dict], tasks: list[str], primaries: dict[str, str]) -> dict:
    """The matrix and its three figures (for the record's ``protocol_report``)."""
    matrix = accuracy_matrix(stages, tasks, primaries)
    return {
        "accuracy_matrix": matrix,
        "average_accuracy": average_accuracy(matrix),
        "backward_transfer": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
    }
