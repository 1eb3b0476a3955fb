"""The ladder search as a driver: run a configuration at the rates its grid asks for, in rounds.

``tune(overrides, LadderSearch(...))`` runs ``lorabench train <overrides> train.lr=<rate>`` for each
rate of the start grid, then the edge extensions those results call for, round after round, until
the grid asks for nothing new (rules in ``lorabench.tuning.ladder``). A rate is attempted once per
call: a failed run leaves its point missing, which stops extension ("sweep not finished"), as in
the leaderboard. Runs are ordinary runs in ``results_dir`` (``lorabench table`` lists them) and
completed ones are skipped, so an interrupted search resumes where it stopped. The outcome goes to
``<results_dir>/tuning/<name>.md`` and ``.json`` (``write_summary``).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Hashable
from pathlib import Path

from lorabench.errors import ConfigError
from lorabench.tuning.ladder import (
    LR_LADDER,
    MAX_EDGE_STEPS,
    check_ladder,
    describe_pick,
    extend_grid,
    missing_rates,
    pick_lr,
    start_grid,
)
from lorabench.tuning.runs import final_metric, read_completed, run_ids_by_rate, run_tasks

TUNING_DIR = "tuning"  # under results_dir: the summaries


def run_rounds(
    grids_for: Callable[[dict], dict[Hashable, list[float]]],
    results: Callable[[], dict[Hashable, dict[float, float]]],
    run: Callable[[list[tuple[Hashable, float]]], list[str]],
) -> list[str]:
    """Rounds of a ladder search over several keys (methods, or one configuration): ``results()``
    gives key -> {lr: metric} so far, ``grids_for(results)`` each key's grid as grown by them; the
    (key, lr) points of the grids without a result are run (``run(points)`` returns the failures),
    then the grids are grown again, until no new point is asked for. A point is attempted at most
    once per call. Returns the failures."""
    attempted: set[tuple[Hashable, float]] = set()
    failures: list[str] = []
    while True:
        found = results()
        grids = grids_for(found)
        todo = [(key, lr) for key, grid in grids.items() for lr in missing_rates(grid, found.get(key, {}))]
        todo = [point for point in todo if point not in attempted]
        if not todo:
            return failures
        attempted.update(todo)
        failures += run(todo)


@dataclasses.dataclass(frozen=True)
class LadderSearch:
    """The ladder search's settings: start rate (None: the configuration's ``train.lr``), extra
    start rates, the ladder, edge extensions allowed, and the neighbour check's rungs up."""

    start: float | None = None
    extra: tuple[float, ...] = ()
    ladder: tuple[float, ...] = LR_LADDER
    max_edge_steps: int = MAX_EDGE_STEPS
    steps_up: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "ladder", check_ladder(self.ladder))
        if self.max_edge_steps < 0:
            raise ConfigError(f"--max-edge-steps {self.max_edge_steps} is invalid; it must be >= 0")
        for rate in (self.start, *self.extra):
            if rate is not None and not rate > 0:
                raise ConfigError(f"learning rate {rate!r} is invalid; it must be > 0")


@dataclasses.dataclass
class Target:
    """What a search tunes: the composed configuration, its metric and where its runs go."""

    overrides: list[str]
    config: dict  # the composed config of ``overrides`` (train.lr as given)
    metric: str
    higher_is_better: bool
    results_dir: Path

    def task(self, lr: float, *extra: str) -> list[str]:
        """The overrides of the run at ``lr`` (``extra`` after it)."""
        return [*self.overrides, f"train.lr={lr}", *extra]

    @property
    def name(self) -> str:
        c = self.config
        return f"{c['method']['label']}-{c['dataset']['name']}-{c['model']['name']}-s{c['seed']}"


def prepare(overrides: list[str], metric: str | None = None) -> Target:
    """Compose and validate ``overrides`` once (bad input: ConfigError before any run) and find the
    metric a search optimizes: ``metric`` or the dataset's primary metric, with its direction."""
    import lorabench.data  # noqa: F401  registers datasets (torch-free)
    from lorabench.config_store import compose
    from lorabench.data.base import resolve_primary
    from lorabench.registry import DATASETS
    from lorabench.validate import check_overrides, validate_config

    overrides = list(overrides)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option(s) {bad} among the Hydra overrides")
    check_overrides(overrides)
    config = compose(overrides)
    cfg = validate_config(config)
    if cfg.method.get("lr") is not None:
        raise ConfigError(
            f"method.lr={cfg.method['lr']!r} overrides train.lr, so the searched rates would not take effect; "
            "drop it (method.lr=null)"
        )
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    metric = metric or resolve_primary(task, cfg.dataset)
    if metric not in task.higher_is_better:
        raise ConfigError(
            f"--metric {metric!r} is not a metric of {task.name!r}; valid choices: {', '.join(task.metrics)}"
        )
    return Target(overrides, config, metric, task.higher_is_better[metric], Path(cfg.results_dir))


@dataclasses.dataclass
class TuneResult:
    """A search's outcome: the grid, lr -> metric of its completed runs, run ids, pick and failures."""

    target: Target
    search: LadderSearch
    start: float
    base: list[float]
    grid: list[float]
    points: dict[float, float]
    run_ids: dict[float, str]
    failures: list[str]

    @property
    def pick(self) -> float | None:
        return pick_lr(self.points, self.target.higher_is_better) if self.points else None

    @property
    def finished(self) -> bool:
        return not missing_rates(self.grid, self.points)

    @property
    def note(self) -> str:
        return describe_pick(self.base, self.grid, self.points, self.target.higher_is_better)


def tune(
    overrides: list[str],
    search: LadderSearch = LadderSearch(),
    jobs: int = 0,
    metric: str | None = None,
    dry_run: bool = False,
) -> TuneResult:
    """The ladder search on the configuration ``overrides`` (``lorabench tune``): runs what the grid
    asks for, round by round (none with ``dry_run``: the grid and pick from the records there
    already), and returns the outcome; ``write_summary`` writes it down."""
    target = prepare(overrides, metric)
    start = search.start if search.start is not None else float(target.config["train"]["lr"])
    base = start_grid(start, search.extra, search.ladder, search.steps_up)
    ids = run_ids_by_rate(target.task, sorted({*base, *search.ladder}))

    def results() -> dict[str, dict[float, float]]:
        points = {lr: final_metric(read_completed(target.results_dir, rid), target.metric) for lr, rid in ids.items()}
        return {"run": {lr: value for lr, value in points.items() if value is not None}}

    def grids_for(found: dict) -> dict[str, list[float]]:
        grown = extend_grid(base, found.get("run", {}), search.ladder, search.max_edge_steps, target.higher_is_better)
        return {"run": grown}

    def run(todo: list[tuple[str, float]]) -> list[str]:
        return run_tasks([target.task(lr) for _, lr in todo], jobs, log="[lorabench tune]")

    failures = [] if dry_run else run_rounds(grids_for, results, run)
    found = results()["run"]
    grid = grids_for({"run": found})["run"]
    points = {lr: found[lr] for lr in grid if lr in found}
    return TuneResult(target, search, start, base, grid, points, {lr: ids[lr] for lr in grid}, failures)


def summary_name(target: Target, kind: str, settings: dict) -> str:
    """``<method>-<dataset>-<model>-s<seed>-<kind>-<hash>``: the hash is of the configuration (its
    rate left out) and the search's settings, so another search gets another file."""
    from lorabench.results.record import config_hash

    config = {**target.config, "train": {k: v for k, v in target.config["train"].items() if k != "lr"}}
    return f"{target.name}-{kind}-{config_hash({**config, 'tuning': settings})[:10]}"


def summary_head(target: Target, kind: str, rule: str, argv: list[str] | None) -> dict:
    """The keys every tuning summary (ladder or Optuna) starts with."""
    return {
        "kind": kind,
        "command": "lorabench tune " + shlex.join(argv if argv is not None else target.overrides),
        "overrides": target.overrides,
        "metric": target.metric,
        "higher_is_better": target.higher_is_better,
        "rule": rule,
    }


def write_summary(result: TuneResult, argv: list[str] | None = None) -> tuple[Path, Path]:
    """``<results_dir>/tuning/<name>.md`` and ``.json``: every grid rate with its metric and run id,
    the pick and what it means (finished, at a grid edge), and the command that trains at it."""
    from lorabench.results.record import write_json_atomic, write_text_atomic

    target, search = result.target, result.search
    settings = {
        "start": result.start,
        "extra": list(search.extra),
        "ladder": list(search.ladder),
        "max_edge_steps": search.max_edge_steps,
        "steps_up": search.steps_up,
    }
    name = summary_name(target, "ladder", settings)
    folder = target.results_dir / TUNING_DIR
    pick = result.pick
    data = {
        **summary_head(
            target,
            "ladder",
            "lorabench.tuning.ladder: start grid + neighbour check, edge extension, best (ties: smaller rate)",
            argv,
        ),
        **settings,
        "start_grid": result.base,
        "grid": result.grid,
        "points": [
            {"lr": lr, "metric": result.points.get(lr), "run_id": result.run_ids[lr], "completed": lr in result.points}
            for lr in result.grid
        ],
        "pick": pick,
        "pick_note": result.note,
        "finished": result.finished,
        "failures": result.failures,
        "train_at_pick": None if pick is None else "lorabench train " + shlex.join(target.task(pick)),
    }
    rows = [
        f"| {lr:g} | {'-' if lr not in result.points else format(result.points[lr], '.4f')} | {result.run_ids[lr]} |"
        for lr in result.grid
    ]
    better = "highest" if target.higher_is_better else "lowest"
    lines = [
        f"# Learning-rate tuning: {target.name} ({target.metric})",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Ladder search (`lorabench.tuning.ladder`): start grid {', '.join(f'{lr:g}' for lr in result.base)}, "
        f"at most {search.max_edge_steps} edge extension(s) along the ladder; the pick is the {better} "
        f"{target.metric} (ties: the smaller rate).",
        "",
        f"| learning rate | {target.metric} | run id |",
        "|---|---|---|",
        *rows,
        "",
        f"Pick: **{result.note}**",
    ]
    if data["train_at_pick"]:
        lines += ["", f"Train at the pick: `{data['train_at_pick']}`"]
    if result.failures:
        lines += ["", "Failed runs:", "", *(f"- {f}" for f in result.failures)]
    md, js = folder / f"{name}.md", folder / f"{name}.json"
    write_json_atomic(js, data)
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md, js


def print_result(result: TuneResult) -> None:
    points = ", ".join(
        f"{lr:g}: {result.points[lr]:.4f}" if lr in result.points else f"{lr:g}: -" for lr in result.grid
    )
    print(f"[lorabench tune] {result.target.name} {result.target.metric}: {points}")
    print(f"[lorabench tune] pick: {result.note}")
