"""The ladder search's rules: pure functions over ``{lr: metric}`` (no runs, no files).

A learning-rate search on a fixed ladder of rates (``LR_LADDER``: 1, 2, 3 or 5 times a power of ten),
grown from a start grid by edge extension, as the shipped leaderboard tunes every method:

1. Start grid (``start_grid``): the start rate plus any ``extra`` rates. A grid that is a single
   rate gets its neighbour ``steps_up`` ladder rungs above (``neighbour_above``; the neighbour
   check: a short schedule more often wants the larger rate), so that every grid has two points and
   edge extension can move the pick either way.
2. Edge extension (``extend_grid``): while every grid rate has a result and the pick is the
   smallest or the largest of two or more rates, add the next ladder rate beyond that edge; at most
   ``max_edge_steps`` additions. A pick strictly inside the grid, a missing result (a run not done,
   or failed) or the end of the ladder stops it.
3. Pick (``pick_lr``): the best metric (highest, or lowest for a lower-is-better metric); ties go
   to the smaller rate.

``describe_pick`` words the outcome for tables: the pick, with "(sweep not finished)" while a grid
rate lacks a result, or "(grid edge after N extension(s))" when the pick is still at an edge once
extension has stopped (the true optimum may lie beyond it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lorabench.errors import ConfigError

LR_LADDER = (1e-5, 2e-5, 3e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1)
MAX_EDGE_STEPS = 2


def check_ladder(ladder: Sequence[float]) -> tuple[float, ...]:
    """The ladder as a tuple; raises ConfigError unless it is strictly increasing positive rates."""
    ladder = tuple(float(lr) for lr in ladder)
    if not ladder or any(lr <= 0 for lr in ladder) or any(a >= b for a, b in zip(ladder, ladder[1:])):
        raise ConfigError(f"--ladder {list(ladder)} is invalid; it must be strictly increasing rates > 0")
    return ladder


def rates_above(rate: float, ladder: Sequence[float] = LR_LADDER) -> list[float]:
    """The ladder rates strictly above ``rate``, nearest first."""
    return [lr for lr in ladder if lr > rate]


def rates_below(rate: float, ladder: Sequence[float] = LR_LADDER) -> list[float]:
    """The ladder rates strictly below ``rate``, nearest first."""
    return [lr for lr in reversed(ladder) if lr < rate]


def neighbour_above(rate: float, ladder: Sequence[float] = LR_LADDER, steps: int = 1) -> float | None:
    """The ladder rate ``steps`` rungs above ``rate`` (a rate off the ladder counts from the first
    rung above it); the top of the ladder when fewer rungs are left; None when ``rate`` is at or
    above the top."""
    if steps < 1:
        raise ConfigError(f"steps_up={steps!r} is invalid; it must be an integer >= 1")
    above = rates_above(rate, ladder)
    return above[min(steps, len(above)) - 1] if above else None


def start_grid(
    start: float, extra: Iterable[float] = (), ladder: Sequence[float] = LR_LADDER, steps_up: int = 1
) -> list[float]:
    """The grid a search starts from: ``start`` and ``extra``, sorted; a single rate also gets
    ``neighbour_above(start, ladder, steps_up)`` (none at the top of the ladder)."""
    grid = sorted({float(start), *(float(lr) for lr in extra)})
    if len(grid) == 1:
        neighbour = neighbour_above(grid[0], ladder, steps_up)
        if neighbour is not None:
            grid.append(neighbour)
    return grid


def pick_lr(points: Mapping[float, float], higher_is_better: bool = True) -> float:
    """The rate with the best metric (the highest, or the lowest when lower is better); ties: the
    smaller rate."""
    if not points:
        raise ValueError("pick_lr needs at least one (learning rate, metric) point")
    best = max(points.values()) if higher_is_better else min(points.values())
    return min(lr for lr, value in points.items() if value == best)


def extend_grid(
    grid: Iterable[float],
    points: Mapping[float, float],
    ladder: Sequence[float] = LR_LADDER,
    max_edge_steps: int = MAX_EDGE_STEPS,
    higher_is_better: bool = True,
) -> list[float]:
    """``grid`` grown by edge extension given the results so far (``points``: lr -> metric; rates
    outside the grid are ignored): while every grid rate has a result and the pick among them is
    the smallest or the largest of two or more rates, add the next ladder rate beyond it, at most
    ``max_edge_steps`` times."""
    grid = sorted(grid)
    for _ in range(max_edge_steps):
        if len(grid) < 2 or any(lr not in points for lr in grid):
            break
        pick = pick_lr({lr: points[lr] for lr in grid}, higher_is_better)
        if pick == grid[-1]:
            beyond = rates_above(pick, ladder)
        elif pick == grid[0]:
            beyond = rates_below(pick, ladder)
        else:
            break
        if not beyond:
            break
        grid = sorted([*grid, beyond[0]])
    return grid


def missing_rates(grid: Iterable[float], points: Mapping[float, float]) -> list[float]:
    """The grid rates without a result yet: what the next round runs."""
    return [lr for lr in grid if lr not in points]


def describe_pick(
    base: Sequence[float], grid: Sequence[float], points: Mapping[float, float], higher_is_better: bool = True
) -> str:
    """The pick as a table shows it: ``-`` without results; "(sweep not finished)" after it while
    a rate of ``grid`` lacks a result; "(grid edge after N extension(s))" when extension has
    stopped with the pick at an edge (N = the rates added to the start grid ``base``)."""
    if not points:
        return "-"
    pick = pick_lr(points, higher_is_better)
    text = f"{pick:g}"
    if missing_rates(grid, points):
        return text + " (sweep not finished)"
    if len(grid) > 1 and pick in (grid[0], grid[-1]):
        text += f" (grid edge after {len(grid) - len(base)} extension(s))"
    return text
