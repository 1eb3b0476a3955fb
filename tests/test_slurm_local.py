"""+sweep=slurm through the same launcher plugin with submitit's local executor (+sweep=slurm_local):
a sweep end to end, and a job preempted by SIGUSR2 that checkpoints, is requeued and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorabench.cli import main
from tests.conftest import tiny_overrides

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _sweep(data: Path, sweep_dir: Path, *extra: str) -> None:
    args = [a for a in tiny_overrides("classification", data, sweep_dir) if not a.startswith("train.max_steps")]
    with pytest.raises(SystemExit) as exc:
        main(["train", "-m", "+sweep=slurm_local", "method=lora", f"hydra.sweep.dir={sweep_dir}", *args, *extra])
    assert exc.value.code == 0


def _records(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/record.json"))]


def test_sweep_runs_each_job_in_its_own_process(sst2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _sweep(sst2_dir, tmp_path / "sweep", "seed=0,1", "train.max_steps=2")
    records = _records(tmp_path / "sweep")
    assert sorted(r["config"]["seed"] for r in records) == [0, 1]
    assert all(r["status"] == "completed" for r in records)
    import os

    assert {r["owner"]["pid"] for r in records}.isdisjoint({os.getpid()})  # submitit's job processes
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2


def test_preempted_job_checkpoints_is_requeued_and_resumes(sst2_dir, tmp_path, monkeypatch):
    """SIGUSR2 (SLURM's warning before the time limit, or preemption) after step 2: the run finishes
    the step, checkpoints, closes its record as canceled and hands the signal to submitit, which
    requeues the job; the requeued job (resume=auto, from the sweep preset) continues from step 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "2")
    monkeypatch.setenv("LORABENCH_FAULT_SIGNAL", "SIGUSR2")
    monkeypatch.setenv("LORABENCH_FAULT_ONCE", str(tmp_path / "fired"))
    _sweep(sst2_dir, tmp_path / "sweep", "seed=0", "train.max_steps=4", "checkpoint.every=1", "train.log_every=1")
    (record,) = _records(tmp_path / "sweep")
    assert (tmp_path / "fired").exists()
    assert record["status"] == "completed"
    assert [entry["step"] for entry in record["resumed_from"]] == [2]
    assert [entry["step"] for entry in record["train_log"]] == [1, 2, 3, 4]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs
