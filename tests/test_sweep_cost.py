"""scripts/sweep_cost.py: what it counts as an Optuna search's cost and pick, and when two picks agree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorabench.tuning import LR_LADDER
from tests.conftest import load_script


@pytest.fixture(scope="module")
def sc():
    yield load_script("sweep_cost")
    sys.modules.pop("sweep_cost", None)
    sys.modules.pop("leaderboard", None)


def test_agreement_is_one_ladder_step(sc):
    widest = max(b / a for a, b in zip(LR_LADDER, LR_LADDER[1:]))
    assert sc.AGREE_FACTOR == pytest.approx(widest)
    assert sc.agree(2e-3, 5e-3) and sc.agree(1e-3, 2e-3) and sc.agree(3.1e-3, 2e-3)
    assert not sc.agree(1e-3, 5e-3) and not sc.agree(2e-2, 2e-3)
    assert sc.agree(None, 1e-3) is None


def _write_run(root: Path, rid: str, steps: int, wall: float) -> None:
    (root / rid).mkdir(parents=True)
    record = {"run_id": rid, "config": {"train": {"max_steps": steps}}, "cost": {"wall_time_s": wall}}
    (root / rid / "record.json").write_text(json.dumps(record))


def test_optuna_cost_counts_every_rung_run_and_picks_the_best_full_run(sc, tmp_path):
    runs = tmp_path / "runs"
    trials = [
        {
            "number": 0,
            "lr": 1e-3,
            "state": "COMPLETE",
            "rungs": [{"steps": 27, "metric": 0.6, "run_id": "a0"}, {"steps": 250, "metric": 0.80, "run_id": "a2"}],
        },
        {"number": 1, "lr": 1e-4, "state": "PRUNED", "rungs": [{"steps": 27, "metric": 0.5, "run_id": "b0"}]},
        {
            "number": 2,
            "lr": 4e-3,
            "state": "COMPLETE",
            "rungs": [{"steps": 27, "metric": 0.7, "run_id": "c0"}, {"steps": 250, "metric": 0.83, "run_id": "c2"}],
        },
        {"number": 3, "lr": 9e-1, "state": "FAIL", "rungs": [{"steps": 27, "metric": None, "run_id": None}]},
    ]
    for rid, steps, wall in (("a0", 27, 10.0), ("a2", 250, 80.0), ("b0", 27, 11.0), ("c0", 27, 9.0), ("c2", 250, 90.0)):
        _write_run(runs, rid, steps, wall)
    (runs / "tuning").mkdir()
    summary = {"trials": trials, "rung_steps": [27, 250]}
    (runs / "tuning" / "lora-sst2-minilm_l6-s0-optuna-abc.json").write_text(json.dumps(summary))
    cost = sc.optuna_cost("lora", tmp_path)
    assert (cost["runs"], cost["steps"], cost["wall_s"]) == (5, 27 * 3 + 500, 200.0)
    assert (cost["trials"], cost["pruned"], cost["full_runs"]) == (4, 1, 2)
    assert (cost["pick"], cost["pick_metric"]) == (4e-3, 0.83)
    assert cost["full_run_s"] == 85.0  # the mean of the two 250-step runs
    assert sc.retimed_s({"runs": 4}, cost) == 340.0
    assert sc.optuna_cost("dora", tmp_path) == {}
