"""lorabench.tuning: the ladder rules on synthetic curves, the committed Track A sweep recomputed by
the package, `lorabench tune` end to end on a tiny model, the pruned Optuna search's rule, and the
Optuna sweeper through Hydra."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.results.record import RECORD_NAME, iter_records
from lorabench.tuning import halving
from lorabench.tuning.ladder import (
    LR_LADDER,
    describe_pick,
    extend_grid,
    neighbour_above,
    pick_lr,
    start_grid,
)
from lorabench.tuning.search import LadderSearch, run_rounds, tune
from tests.conftest import load_script, tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
LEADERBOARD = ROOT / "results" / "leaderboard"


def peaked(optimum: float):
    """A unimodal curve in log(lr), best at ``optimum``."""
    return lambda lr: -((math.log10(lr) - math.log10(optimum)) ** 2)


def search(curve, base, max_edge_steps=2, fail=()):
    """The ladder search driven by ``run_rounds`` on a synthetic curve: (grid, points, rounds run)."""
    points: dict[float, float] = {}
    rounds = []

    def run(todo):
        rounds.append(sorted(lr for _, lr in todo))
        points.update({lr: curve(lr) for _, lr in todo if lr not in fail})
        return [f"lr={lr}" for _, lr in todo if lr in fail]

    failures = run_rounds(
        lambda found: {"m": extend_grid(base, found.get("m", {}), LR_LADDER, max_edge_steps)},
        lambda: {"m": dict(points)},
        run,
    )
    return extend_grid(base, points, LR_LADDER, max_edge_steps), points, rounds, failures


# -- the rules -----------------------------------------------------------------------------------------
def test_start_grid_adds_the_neighbour_only_to_a_single_rate():
    assert start_grid(5e-4) == [5e-4, 1e-3]
    assert start_grid(5e-4, steps_up=2) == [5e-4, 2e-3]
    assert start_grid(5e-4, extra=[2e-3, 5e-3]) == [5e-4, 2e-3, 5e-3]  # extra points: no neighbour
    assert start_grid(5e-4, extra=[2e-3]) == [5e-4, 2e-3]
    assert start_grid(5e-4, extra=[5e-4]) == [5e-4, 1e-3]  # a duplicate is still one rate
    assert start_grid(3e-4) == [3e-4, 5e-4]  # off the ladder: the first rung above
    assert start_grid(2e-1, steps_up=2) == [2e-1, 5e-1]  # clamped at the top of the ladder
    assert start_grid(5e-1) == [5e-1] and neighbour_above(5e-1) is None  # nothing above the top
    assert describe_pick([5e-1], [5e-1], {5e-1: 0.8}) == "0.5"  # one rate: no edge to speak of
    assert describe_pick([5e-4, 1e-3], [5e-4, 1e-3], {}) == "-"


def test_pick_takes_the_best_and_the_smaller_rate_on_ties():
    assert pick_lr({1e-4: 0.7, 5e-4: 0.8, 1e-3: 0.75}) == 5e-4
    assert pick_lr({1e-3: 0.8, 5e-4: 0.8, 2e-3: 0.79}) == 5e-4
    assert pick_lr({1e-4: 2.0, 5e-4: 1.5, 1e-3: 1.5}, higher_is_better=False) == 5e-4


def test_extension_adds_exactly_max_edge_steps_along_a_rising_curve():
    rising = {lr: math.log(lr) for lr in LR_LADDER}
    assert extend_grid([5e-4, 1e-3], rising, max_edge_steps=0) == [5e-4, 1e-3]
    assert extend_grid([5e-4, 1e-3], rising, max_edge_steps=1) == [5e-4, 1e-3, 2e-3]
    assert extend_grid([5e-4, 1e-3], rising, max_edge_steps=2) == [5e-4, 1e-3, 2e-3, 5e-3]
    falling = {lr: -math.log(lr) for lr in LR_LADDER}
    assert extend_grid([5e-4, 1e-3], falling) == [1e-4, 2e-4, 5e-4, 1e-3]  # down, nearest first
    assert extend_grid([2e-1, 5e-1], rising) == [2e-1, 5e-1]  # the ladder ends: nothing beyond
    assert extend_grid([5e-4], rising) == [5e-4]  # one point has no edge to extend


def test_extension_stops_inside_and_at_a_missing_point():
    curve = peaked(2e-3)
    points = {lr: curve(lr) for lr in LR_LADDER}
    assert extend_grid([5e-4, 1e-3], points, max_edge_steps=5) == [5e-4, 1e-3, 2e-3, 5e-3]  # 2e-3 inside: stop
    assert extend_grid([1e-3, 2e-3, 5e-3], points) == [1e-3, 2e-3, 5e-3]  # already inside
    del points[2e-3]
    assert extend_grid([5e-4, 1e-3], points) == [5e-4, 1e-3, 2e-3]  # 2e-3 not run yet: wait for it
    tie = {5e-4: 0.8, 1e-3: 0.8}
    assert extend_grid([5e-4, 1e-3], tie) == [2e-4, 5e-4, 1e-3]  # a tie picks the smaller rate: the lower edge
    lower_better = {lr: math.log(lr) for lr in LR_LADDER}  # e.g. a loss that grows with the rate
    assert extend_grid([5e-4, 1e-3], lower_better, higher_is_better=False) == [1e-4, 2e-4, 5e-4, 1e-3]


@pytest.mark.parametrize(
    "optimum,grid,rounds",
    [
        (5e-4, [2e-4, 5e-4, 1e-3], [[5e-4, 1e-3], [2e-4]]),  # the start rate wins: one step down, then inside
        (1e-3, [5e-4, 1e-3, 2e-3], [[5e-4, 1e-3], [2e-3]]),  # the neighbour wins: one step up
        (1e-2, [5e-4, 1e-3, 2e-3, 5e-3], [[5e-4, 1e-3], [2e-3], [5e-3]]),  # far away: two steps, then an edge
    ],
)
def test_rounds_run_the_grid_then_one_extension_each(optimum, grid, rounds):
    found_grid, points, ran, failures = search(peaked(optimum), [5e-4, 1e-3])
    assert (found_grid, ran, failures) == (grid, rounds, [])
    assert pick_lr(points) == min(grid, key=lambda lr: abs(math.log10(lr) - math.log10(optimum)))
    note = describe_pick([5e-4, 1e-3], found_grid, points)
    assert note == ("0.005 (grid edge after 2 extension(s))" if optimum == 1e-2 else f"{pick_lr(points):g}")


def test_a_failed_point_is_not_retried_and_leaves_the_sweep_unfinished():
    grid, points, ran, failures = search(peaked(1e-2), [5e-4, 1e-3], fail={2e-3})
    assert ran == [[5e-4, 1e-3], [2e-3]] and failures == ["lr=0.002"]
    assert grid == [5e-4, 1e-3, 2e-3] and describe_pick([5e-4, 1e-3], grid, points) == "0.001 (sweep not finished)"


# -- the committed Track A sweep, recomputed ---------------------------------------------------------
def _sweep_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (LEADERBOARD / "sweep.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("method", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.fixture(scope="module")
def lb():
    yield load_script("leaderboard")
    sys.modules.pop("leaderboard", None)


def test_committed_track_a_sweep_recomputes_to_sweep_md(lb, tmp_path, monkeypatch):
    """The picks sweep.md shows are what the package's rules give on the committed sweep records:
    the leaderboard's table regenerated through lorabench.tuning is sweep.md, byte for byte, and
    ``tune`` (dry run: it reads the records, runs nothing) gives the grid and pick of methods that
    exercise each rule. Records are found by run id, as the leaderboard finds them."""
    from lorabench.results.record import run_id

    monkeypatch.chdir(ROOT)  # relative paths in records are relative to the project root
    records = [r for _, r, _ in iter_records(LEADERBOARD / "sweep") if r]
    data_dirs = {r["config"]["dataset"].get("data_dir") for r in records}
    assert len(data_dirs) == 1, data_dirs  # one protocol, one data folder
    data_dir = data_dirs.pop()
    if any(run_id(r["config"]) != r["run_id"] for r in records[:3]):
        pytest.skip("the committed sweep records' run ids are not this code's run ids of their own configs")
    methods = sorted(_sweep_rows())
    found = lb.sweep_results(LEADERBOARD / "sweep", methods, data_dir)
    lb.write_sweep_table(tmp_path / "sweep.md", methods, found)
    assert (tmp_path / "sweep.md").read_text() == (LEADERBOARD / "sweep.md").read_text()
    rows = _sweep_rows()
    for method in ("lora", "adalora", "nola", "dylora", "full"):  # neighbour check, extras, edges, family rates
        base = lb.overrides(method, 0.0, 0, LEADERBOARD / "sweep", data_dir)
        base = [o for o in base if not o.startswith("train.lr=")]
        extra = tuple(lb.EXTRA_LR.get(method, ()))
        result = tune(base, LadderSearch(start=lb.FAMILY_LR.get(method, lb.DEFAULT_LR), extra=extra), dry_run=True)
        cells = ", ".join(
            f"{lr:g}: {100 * result.points[lr]:.2f}" if lr in result.points else f"{lr:g}: -" for lr in result.grid
        )
        assert (cells, result.note) == rows[method], method
        assert result.failures == []  # a dry run ran nothing


# -- lorabench tune, end to end ------------------------------------------------------------------------
def _records(folder: Path) -> dict[float, dict]:
    return {r["config"]["train"]["lr"]: r for _, r, _ in iter_records(folder) if r and r["status"] == "completed"}


def test_tune_runs_the_grid_and_one_extension_and_resumes(sst2_dir, tmp_path, capsys):
    args = [*tiny_overrides("classification", sst2_dir, tmp_path), "train.max_steps=2"]
    with pytest.raises(SystemExit) as exc:
        main(["tune", *args, "--start", "1e-3", "--max-edge-steps", "1"])
    assert exc.value.code == 0
    runs = _records(tmp_path)
    points = {lr: r["metrics"]["final"]["accuracy"] for lr, r in runs.items()}
    assert len(runs) == 3  # [1e-3, 2e-3] and the one extension the results call for
    grid = extend_grid([1e-3, 2e-3], points, max_edge_steps=1)
    assert sorted(points) == grid and ({5e-4, 5e-3} & set(grid))
    [summary] = (tmp_path / "tuning").glob("*.json")
    data = json.loads(summary.read_text())
    assert data["grid"] == grid and data["pick"] == pick_lr(points) and data["metric"] == "accuracy"
    assert {p["lr"]: p["metric"] for p in data["points"]} == points  # the records' numbers
    assert {p["run_id"] for p in data["points"]} == {r["run_id"] for r in runs.values()}
    assert f"train.lr={pick_lr(points)}" in data["train_at_pick"]
    assert summary.with_suffix(".md").read_text().count("| lora-sst2-tiny_bert-s0-") == 3
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.rglob(RECORD_NAME)}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a rerun finds every point done: nothing runs again
        main(["tune", *args, "--start", "1e-3", "--max-edge-steps", "1"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "[lorabench tune] 1/" not in out and f"pick: {data['pick']:g}" in out
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob(RECORD_NAME)} == stamps


def test_tune_refuses_a_method_lr_that_would_override_the_rates(sst2_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", *tiny_overrides("classification", sst2_dir, tmp_path), "method.lr=1e-3"])
    assert exc.value.code == 2 and "method.lr=0.001 overrides train.lr" in capsys.readouterr().err
    assert not list(tmp_path.rglob(RECORD_NAME))


# -- the pruned Optuna search ------------------------------------------------------------------------
def test_successive_halving_prunes_by_the_asha_rule(sst2_dir, tmp_path, monkeypatch):
    """With a fake training (score = closeness of lr to 1e-3, more steps add a little), each trial's
    rungs follow ASHA: it goes past rung 0 only if its score is within the top 1/eta of the rung-0
    scores so far (the best while fewer than eta); a pruned trial's longer run never starts."""
    pytest.importorskip("optuna")
    ran = []

    def score(task):
        lr = float(next(o for o in task if o.startswith("train.lr=")).split("=")[1])
        steps = int(next(o for o in reversed(task) if o.startswith("train.max_steps=")).split("=")[1])
        return -abs(math.log10(lr) + 3) + steps / 1000

    monkeypatch.setattr(halving, "run_tasks", lambda tasks, *a, **k: ran.extend(tasks) or [])
    fake = {"status": "completed", "run_id": "fake"}
    monkeypatch.setattr(
        halving, "read_if_completed", lambda folder, task: {**fake, "metrics": {"final": {"accuracy": score(task)}}}
    )
    overrides = [*tiny_overrides("classification", sst2_dir, tmp_path), "train.max_steps=8"]
    search = halving.OptunaSearch(trials=10, rungs=2, reduction_factor=2, seed=1)
    result = halving.optuna_tune(overrides, search)
    assert result.steps == [4, 8]
    rung0: list[float] = []
    for trial in result.trials:
        value = trial["rungs"][0]["metric"]
        competing = sorted([*rung0, value])
        index = max(len(competing) // 2 - 1, 0)
        promoted = value >= competing[-(index + 1)]
        rung0.append(value)
        assert trial["state"] == ("COMPLETE" if promoted else "PRUNED"), trial
        assert len(trial["rungs"]) == (2 if promoted else 1)
    assert 0 < sum(t["state"] == "PRUNED" for t in result.trials) < len(result.trials)
    assert len(ran) == sum(len(t["rungs"]) for t in result.trials)  # no run for a pruned trial's long rung
    best = max((t for t in result.trials if t["state"] == "COMPLETE"), key=lambda t: t["rungs"][-1]["metric"])
    assert result.best["lr"] == best["lr"]


def test_optuna_tune_runs_each_rung_as_its_own_shorter_run(sst2_dir, tmp_path):
    pytest.importorskip("optuna")
    args = [*tiny_overrides("classification", sst2_dir, tmp_path), "train.max_steps=4"]
    with pytest.raises(SystemExit) as exc:
        main(["tune", *args, "--search", "optuna", "--trials", "2", "--rungs", "2", "--reduction-factor", "2"])
    assert exc.value.code == 0
    [summary] = (tmp_path / "tuning").glob("*optuna*.json")
    data = json.loads(summary.read_text())
    by_id = {r["run_id"]: r for _, r, _ in iter_records(tmp_path) if r}
    assert data["rung_steps"] == [2, 4] and len(data["trials"]) == 2
    for trial in data["trials"]:
        for rung in trial["rungs"]:
            record = by_id[rung["run_id"]]
            assert record["config"]["train"]["max_steps"] == rung["steps"]
            assert record["config"]["train"]["lr"] == trial["lr"] and 1e-5 <= trial["lr"] <= 1e-1
            assert record["metrics"]["final"]["accuracy"] == rung["metric"]
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert data["pick"] == max(done, key=lambda t: (t["rungs"][-1]["metric"], -t["number"]))["lr"]


def test_hydra_optuna_sweeper_gets_the_runs_metric(sst2_dir, tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    monkeypatch.chdir(tmp_path)
    args = ["train", "-m", "hydra/sweeper=lr_optuna", "hydra.sweeper.n_trials=2"]
    with pytest.raises(SystemExit) as exc:
        main([*args, *tiny_overrides("classification", sst2_dir, tmp_path)])
    assert exc.value.code == 0
    runs = _records(tmp_path)
    assert len(runs) == 2 and all(1e-5 <= lr <= 1e-1 for lr in runs)
    [result] = tmp_path.rglob("optimization_results.yaml")
    import yaml

    best = yaml.safe_load(result.read_text())
    accuracy = {lr: r["metrics"]["final"]["accuracy"] for lr, r in runs.items()}
    assert best["best_value"] == max(accuracy.values())  # the task returned each run's metric to Optuna
    assert accuracy[best["best_params"]["train.lr"]] == best["best_value"]


def test_worker_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """``taskset``/cgroups/Slurm can give a process fewer CPUs than the machine has: the per-worker thread
    count divides the process's affinity mask, not ``os.cpu_count``."""
    from lorabench.tuning import runs

    if not hasattr(runs.os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this platform")
    monkeypatch.setattr(runs.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(runs.os, "sched_getaffinity", lambda pid: {3})
    assert runs.usable_cpus() == 1
    monkeypatch.setattr(runs.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert runs.usable_cpus() == 4
