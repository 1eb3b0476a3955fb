"""End-to-end runs of `lorabench train` on tiny models and fixture data: one per dataset family,
the record schema, skip-on-rerun, failure records, and a 2-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.results.record import REQUIRED_KEYS, validate_record
from tests.conftest import tiny_overrides


def train(*overrides: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    return exc.value.code


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("record.json"))]


@pytest.mark.parametrize(
    "kind,method",
    [("classification", "lora"), ("causal_lm", "galore"), ("classification", "full"), ("classification", "lora_xs")],
)
def test_smoke_run_writes_complete_record(kind, method, sst2_dir, gsm8k_dir, tmp_path):
    data = sst2_dir if kind == "classification" else gsm8k_dir
    assert train(f"method={method}", *tiny_overrides(kind, data, tmp_path)) == 0
    (record,) = records(tmp_path)
    assert validate_record(record) is None and set(REQUIRED_KEYS) <= set(record)
    assert record["status"] == "completed" and record["error"] is None
    primary = record["metrics"]["primary"]
    assert primary == ("accuracy" if kind == "classification" else "exact_match")
    assert 0.0 <= record["metrics"]["final"][primary] <= 1.0
    assert record["metrics"]["best"]["step"] == 2
    assert record["dataset"]["source"]["kind"] == "local"
    assert record["model"]["source"]["kind"] == "random"
    cost = record["cost"]
    assert cost["trainable_params"] > 0 and cost["optimizer_state_bytes"] > 0 and cost["tokens_per_s"] > 0
    assert cost["peak_memory"]["cpu_peak_rss_bytes"] > 0
    has_adapter = method in ("lora", "lora_xs")
    assert (cost["adapter_file_bytes"] or 0) > 0 if has_adapter else cost["adapter_file_bytes"] is None
    analysis = record["analysis"]  # intruder dimensions of every targeted weight, whatever the method
    assert analysis["intruders_per_layer"] and not analysis["intruders_skipped"]
    assert analysis["intruders_total"] == sum(analysis["intruders_per_layer"].values())
    assert record["provenance"]["versions"]["torch"]
    assert len(record["train_log"]) >= 1 and record["hardware"]["gradient_accumulation"] == 2


def test_rerun_is_skipped_unless_forced(sst2_dir, tmp_path, capsys):
    args = ["method=lora", *tiny_overrides("classification", sst2_dir, tmp_path)]
    assert train(*args) == 0
    first = records(tmp_path)[0]
    assert train(*args) == 0
    assert "skip" in capsys.readouterr().out
    assert records(tmp_path)[0]["finished_at"] == first["finished_at"]
    assert train(*args, "force=true") == 0
    assert len(records(tmp_path)) == 1  # same deterministic run id


def test_failed_run_leaves_failed_record(sst2_dir, tmp_path):
    # a data folder that does not exist fails inside the run, after the record exists
    code = train("method=lora", *tiny_overrides("classification", Path("/nonexistent"), tmp_path))
    assert code != 0
    (record,) = records(tmp_path)
    assert record["status"] == "failed"
    assert "does not exist" in record["error"]["message"]


def test_multirun_one_record_per_run(sst2_dir, tmp_path):
    assert train("-m", "method=full,lora", "seed=0,1", *tiny_overrides("classification", sst2_dir, tmp_path)) == 0
    recs = records(tmp_path)
    assert len(recs) == 4
    assert {(r["method"]["label"], r["config"]["seed"]) for r in recs} == {
        (m, s) for m in ("full", "lora") for s in (0, 1)
    }


def test_two_process_run_matches_single_process_fields(sst2_dir, tmp_path):
    base = tiny_overrides("classification", sst2_dir, tmp_path)
    cmd = [sys.executable, "-m", "lorabench.cli", "train", "method=lora", *base]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [*cmd, "hardware=cpu_ddp2", "hardware.micro_batch_size=1"], capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    recs = {r["hardware"]["num_processes"]: r for r in records(tmp_path)}
    assert set(recs) == {1, 2}
    assert set(recs[1]) == set(recs[2])
    assert set(recs[1]["cost"]) == set(recs[2]["cost"])
    assert recs[2]["status"] == "completed"
    assert recs[2]["hardware"]["gradient_accumulation"] == 2
    assert recs[2]["cost"]["train_tokens"] > 0


@pytest.mark.parametrize("method,budget", [("lora", 6000), ("nola", 6000), ("lisa", 1_005_000)])
def test_budget_sizes_the_method_in_the_loop(method, budget, sst2_dir, tmp_path):
    assert (
        train(
            f"method={method}",
            *tiny_overrides("classification", sst2_dir, tmp_path),
            f"budget.trainable_params={budget}",
        )
        == 0
    )
    (record,) = records(tmp_path)
    solved = record["method_report"]["budget"]
    assert record["cost"]["trainable_params"] == solved["predicted"] <= budget
    assert record["cost"]["expected_trainable_params"] == solved["predicted"]
    knob = solved["knob"].split("=")[0]
    assert record["config"]["method"][knob] == solved["value"]


def test_dylora_records_its_rank_curve(sst2_dir, tmp_path):
    assert (
        train(
            "method=dylora",
            "method.rank=4",
            "method.eval_all_ranks=true",
            *tiny_overrides("classification", sst2_dir, tmp_path),
        )
        == 0
    )
    (record,) = records(tmp_path)
    curve = record["method_report"]["rank_curve"]
    assert sorted(int(k) for k in curve) == [1, 2, 3, 4]
    assert all(0.0 <= v <= 1.0 for v in curve.values())
    assert record["method_report"]["rank_curve_metrics"]["4"]["accuracy"] == record["metrics"]["final"]["accuracy"]


def test_wandb_tracker_offline(sst2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train("method=lora", "tracker=wandb", *tiny_overrides("classification", sst2_dir, tmp_path)) == 0
    (record,) = records(tmp_path)
    assert record["status"] == "completed"
    assert list(tmp_path.rglob("wandb/offline-run-*")), "no offline W&B run was written"
    # offline runs keep their summary inside the binary .wandb file: the summary's content is checked
    # through cost_summary (below) and, on a real store, by the MLflow test
    assert list(tmp_path.rglob("wandb/offline-run-*/files/lorabench_record.json")), "the record is not a run file"


def test_cost_summary_holds_the_figures_methods_are_compared_by():
    from lorabench.trackers import cost_summary

    record = {
        "cost": {
            "peak_memory": {"cpu_peak_rss_bytes": 3 * 2**20, "cuda_allocated_bytes": None},
            "tokens_per_s": 12.5,
            "trainable_params": 74_498,
            "total_params": 1_000_000,
            "optimizer_state_bytes": 2**20,
            "wall_time_s": 9.0,
        },
        "metrics": {"final": {"accuracy": 0.8, "f1": None}},
    }
    assert cost_summary(record) == {
        "cost/peak_memory_mb": 3.0,
        "cost/tokens_per_s": 12.5,
        "cost/trainable_params": 74_498,
        "cost/total_params": 1_000_000,
        "cost/optimizer_state_mb": 1.0,
        "cost/wall_time_s": 9.0,
        "final/accuracy": 0.8,
    }


def test_lora_ga_gradient_estimate_is_cached_per_seed_when_the_seed_draws_the_head(sst2_dir, tmp_path, monkeypatch):
    """The tiny classifier's head (and, here, every weight) comes from the seed: seed 1 must not reuse
    seed 0's gradient (it did before the key held the seed)."""
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    for seed in (0, 1):
        assert train("method=lora_ga", f"seed={seed}", *tiny_overrides("classification", sst2_dir, tmp_path)) == 0
    by_seed = {r["config"]["seed"]: r["method_report"]["lora_ga_gradient_cache"] for r in records(tmp_path)}
    assert by_seed[0]["hit"] is False and by_seed[1]["hit"] is False
    assert by_seed[0]["path"] != by_seed[1]["path"] and by_seed[1]["path"].endswith("-seed1.safetensors")
    assert "classification head drawn from the seed" in by_seed[1]["per_seed"]


def test_mlflow_tracker_file_store(sst2_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is a dev dependency; install it to run this test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert train("method=lora", "tracker=mlflow", *tiny_overrides("classification", sst2_dir, tmp_path)) == 0
    (record,) = records(tmp_path)
    assert record["status"] == "completed"
    metric_files = list((tmp_path / "mlruns").rglob("metrics/eval_accuracy"))
    assert metric_files, "no MLflow metric was written"
    (params,) = (tmp_path / "mlruns").rglob("metrics/cost_trainable_params")
    assert float(params.read_text().split()[1]) == record["cost"]["trainable_params"]
    assert list((tmp_path / "mlruns").rglob("artifacts/lorabench_record.json")), "the record is not an artifact"
