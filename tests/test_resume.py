"""A run interrupted at step k (SIGTERM, via LORABENCH_FAULT_AT_STEP) and resumed with
resume=auto ends with exactly the same weights, metrics and history as an uninterrupted run
(bitwise on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorabench.checkpoint import list_checkpoints
from lorabench.cli import main
from tests.conftest import tiny_overrides

STEPS = ["train.max_steps=6", "train.eval_every=3", "checkpoint.every=2", "train.warmup_ratio=0.2"]


def train(*overrides: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    return exc.value.code


def only_run_dir(root: Path) -> Path:
    (record,) = root.rglob("record.json")
    return record.parent


def run_pair(method: str, data: Path, tmp: Path, monkeypatch, *extra: str, kind="classification"):
    def args(root: Path):
        base = [a for a in tiny_overrides(kind, data, root) if not a.startswith("train.max_steps")]
        return [f"method={method}", *base, *STEPS, *extra]

    assert train(*args(tmp / "a")) == 0
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "3")
    assert train(*args(tmp / "b")) == 130
    monkeypatch.delenv("LORABENCH_FAULT_AT_STEP")
    b_dir = only_run_dir(tmp / "b")
    interrupted = json.loads((b_dir / "record.json").read_text())
    assert interrupted["status"] == "canceled" and interrupted["error"]["step"] == 3
    assert [p.name for p in list_checkpoints(b_dir)] == ["step_2", "step_3"]
    assert train(*args(tmp / "b"), "resume=auto") == 0
    a_dir = only_run_dir(tmp / "a")
    return a_dir, b_dir


CASES = [
    ("lora", "classification", []),
    ("galore", "classification", []),
    # LISA and BAdam freeze layers they trained before: the checkpoint must hold those too
    ("lisa", "classification", ["method.lisa_activated_layers=1", "method.lisa_interval_steps=2"]),
    ("badam", "classification", ["method.switch_every=2"]),
    ("eva", "classification", []),  # data-driven init: re-run from the same calibration batches
    ("full", "causal_lm", []),
    # LaMDA++ at rank 2: t = floor(g / 1.8) zeroes PMB's first column before the cut; PMB stops training after it
    ("lamda_plus", "classification", ["method.rank=2"]),
    # IncreLoRA: rounds at steps 2, 3, 4 around the cut, new components stepped as their own AdamW groups
    (
        "increlora",
        "classification",
        ["method.target_r=4", "method.add_per_round=2", "method.delta_t=1", "method.tinit=1"]
        + ["method.new_warmup_ratio=0.2"],
    ),
    # regularizers: MGPO's gradient-norm averages come back from regularizer.pt; BA-LoRA's terms in the log
    ("mgpo", "classification", []),
    ("ba_lora", "classification", []),
    # FSDP2 (one process, a world of one): whole tensors and optimizer state gathered by
    # torch.distributed.checkpoint, loaded back into the shards
    ("lora-fsdp", "classification", ["hardware.strategy=fsdp"]),
    ("full-fsdp", "causal_lm", ["hardware.strategy=fsdp"]),
    # GaLore under FSDP2: its subspace state (basis, moments) is whole on every process beside the shards
    ("galore-fsdp", "classification", ["hardware.strategy=fsdp"]),
]


@pytest.mark.parametrize("method,kind,extra", CASES, ids=[c[0] for c in CASES])
def test_resume_is_bitwise_equal(method, kind, extra, sst2_dir, gsm8k_dir, tmp_path, monkeypatch):
    data = sst2_dir if kind == "classification" else gsm8k_dir
    method = method.removesuffix("-fsdp")
    a_dir, b_dir = run_pair(method, data, tmp_path, monkeypatch, *extra, kind=kind)
    a, b = (json.loads((d / "record.json").read_text()) for d in (a_dir, b_dir))
    assert b["status"] == "completed" and b["resumed_from"][0]["step"] == 3
    assert a["history"] == b["history"] and len(a["history"]) == 2
    assert a["train_log"] == b["train_log"]
    assert a["metrics"]["final"] == b["metrics"]["final"]
    periods = b["method_report"].get("lisa_periods") or b["method_report"].get("badam_periods") or []
    if method in ("lisa", "badam"):  # the case only tests something if a trained layer was frozen before step 3
        early = [str(p.get("layers", p.get("block"))) for p in periods if p["start_step"] < 3]
        assert len(set(early)) >= 2, periods
    wa = load_file(str(list_checkpoints(a_dir)[-1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(b_dir)[-1] / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_checkpoints_are_pruned_and_atomic(sst2_dir, tmp_path):
    base = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if not a.startswith("train.max_steps")]
    assert train("method=lora", *base, *STEPS, "checkpoint.keep=1") == 0
    run_dir = only_run_dir(tmp_path)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_6"]
    # a half-written checkpoint (no meta.json) is ignored
    (run_dir / "checkpoints" / "step_9").mkdir()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_6"]
