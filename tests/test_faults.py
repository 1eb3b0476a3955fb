"""Faults: non-finite losses, out-of-memory and failing runs inside a sweep, each answered by a record
and one clear message. Concurrent trainers of one results folder: tests/test_concurrency.py. Bad input (configs, shapes,
malformed data files) is the corpus of tests/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorabench.train as train_module
from lorabench.cli import main
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


def test_nonfinite_skip_that_fails_keeps_the_skipped_steps(sst2_dir, tmp_path, monkeypatch):
    """Step 2 is skipped once (NaN), its retry is NaN again: with max_skipped_steps=1 the run fails,
    and the record still lists the step it skipped."""

    def nan_at_third_and_fifth(n, out):
        if n in (3, 5):
            out.loss = out.loss * float("nan")

    patch_forward(monkeypatch, nan_at_third_and_fifth)
    args = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if not a.startswith("train.max_steps")]
    extra = ["train.max_steps=3", "train.nonfinite=skip", "train.max_skipped_steps=1"]
    assert train("method=full", *args, *extra) == 1
    (rec,) = records(tmp_path)
    assert rec["status"] == "failed" and rec["error"]["type"] == "FloatingPointError"
    (event,) = rec["method_report"]["skipped_nonfinite_steps"]
    assert event["step"] == 2 and event["first_nonfinite_grad"].startswith("bert.")


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


def test_trust_remote_code_is_off_by_default():
    from lorabench.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
