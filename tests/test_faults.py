"""Faults: non-finite losses, out-of-memory, failing runs inside a sweep and concurrent writers to
one results folder, each answered by a record and one clear message. Bad input (configs, shapes,
malformed data files) is the corpus of tests/test_bad_input.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorabench.train as train_module
from lorabench.cli import main
from lorabench.results.table import build_table
from tests.conftest import tiny_overrides


def train(*overrides: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    return exc.value.code


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("record.json"))]


def patch_forward(monkeypatch, fault):
    """Wrap the built model's forward so that ``fault(call_number, output)`` can corrupt training calls."""
    real = train_module.apply_method

    def patched(model, spec, ctx):
        built = real(model, spec, ctx)
        original, calls = built.model.forward, {"n": 0}

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            if "labels" in kwargs:
                calls["n"] += 1
                fault(calls["n"], out)
            return out

        built.model.forward = forward
        return built

    monkeypatch.setattr(train_module, "apply_method", patched)


def test_nonfinite_loss_stops_and_names_step(sst2_dir, tmp_path, monkeypatch):
    def nan_at_third(n, out):
        if n == 3:
            out.loss = out.loss * float("nan")

    patch_forward(monkeypatch, nan_at_third)
    assert train("method=full", *tiny_overrides("classification", sst2_dir, tmp_path)) == 1
    (rec,) = records(tmp_path)
    assert rec["status"] == "failed" and rec["error"]["type"] == "FloatingPointError"
    assert "step 2" in rec["error"]["message"] and "first non-finite gradient: bert." in rec["error"]["message"]


def test_nonfinite_skip_continues(sst2_dir, tmp_path, monkeypatch):
    def nan_at_third(n, out):
        if n == 3:
            out.loss = out.loss * float("nan")

    patch_forward(monkeypatch, nan_at_third)
    args = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if not a.startswith("train.max_steps")]
    assert train("method=full", *args, "train.max_steps=3", "train.nonfinite=skip") == 0
    (rec,) = records(tmp_path)
    assert rec["status"] == "completed"
    (event,) = rec["method_report"]["skipped_nonfinite_steps"]
    assert event["step"] == 2 and event["first_nonfinite_grad"].startswith("bert.")
    assert rec["train_log"][-1]["step"] == 3


def test_out_of_memory_is_recorded_with_hint(sst2_dir, tmp_path, monkeypatch):
    def oom(n, out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    patch_forward(monkeypatch, oom)
    assert train("method=lora", *tiny_overrides("classification", sst2_dir, tmp_path)) == 1
    (rec,) = records(tmp_path)
    assert rec["status"] == "failed" and "micro_batch_size" in rec["error"]["hint"]
    assert rec["cost"]["peak_memory"]["cpu_peak_rss_bytes"] > 0


def test_failing_run_does_not_stop_the_sweep(sst2_dir, tmp_path, capsys):
    code = train(
        "-m",
        "method=lora",
        "dataset.data_dir=/nonexistent," + str(sst2_dir),
        *[a for a in tiny_overrides("classification", sst2_dir, tmp_path) if not a.startswith("dataset.data_dir")],
    )
    assert code != 0
    statuses = sorted(r["status"] for r in records(tmp_path))
    assert statuses == ["completed", "failed"]
    out = capsys.readouterr().out
    assert "sweep summary" in out and "failed" in out and "completed" in out


def test_concurrent_runs_lose_nothing(sst2_dir, tmp_path):
    n = 3
    cmd = [
        sys.executable,
        "-m",
        "lorabench.cli",
        "train",
        "method=lora",
        *tiny_overrides("classification", sst2_dir, tmp_path),
    ]
    procs = [
        subprocess.Popen(
            [*cmd, f"seed={seed}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )
        for seed in range(n)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    recs = records(tmp_path)
    assert len(recs) == n and {r["config"]["seed"] for r in recs} == set(range(n))
    assert all(r["status"] == "completed" for r in recs)
    text, problems = build_table(tmp_path)
    assert not problems and f"(n={n})" in text
    assert not list(tmp_path.rglob("*.tmp"))


def test_trust_remote_code_is_off_by_default():
    from lorabench.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
