"""Every method preset resumes exactly (the plain-adapter presets beyond their representatives under
``-m slow``: RESUME_CASES): a run restarted from its step-3 checkpoint ends with the same
weights, optimizer state, procedure state, history, train log and metrics as the run that never
stopped (bitwise on CPU).

Each case trains once for 6 steps with a checkpoint after every step, then copies the run folder up to
its step-3 checkpoint into a second results folder, marks that record canceled (what an interrupted
run leaves) and resumes it. The checkpoint is the one an interruption at step 3 writes (the signal
path itself is tested in tests/test_resume.py); copying it saves a third training run per preset.
``MOVES`` makes every schedule move before the cut: projectors refresh at step 2, LISA and BAdam
switch layers at step 2, AdaLoRA reallocates ranks and DyLoRA draws a rank every step, LaMDA
freezes a column at step 2, IncreLoRA adds components at steps 2 and 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorabench.checkpoint import list_checkpoints
from tests.conftest import tiny_overrides
from tests.test_method_matrix import CUDA_ONLY, NEEDS_EXPERTS, PRESETS
from tests.test_resume import only_run_dir, train

CUT = 3
STEPS = ["train.max_steps=6", "train.eval_every=3", "checkpoint.every=1", "checkpoint.keep=10"]
STEPS += ["train.warmup_ratio=0.2"]
PROJECTOR_GAP = ["method.update_proj_gap=2"]
MOVES = {
    "galore": PROJECTOR_GAP,
    "galore_torch": PROJECTOR_GAP,
    "fira": PROJECTOR_GAP,
    "q_galore": PROJECTOR_GAP,
    "dct_adamw": PROJECTOR_GAP,
    "frugal": ["method.update_gap=2"],
    "lisa": ["method.lisa_activated_layers=1", "method.lisa_interval_steps=2"],
    "badam": ["method.switch_every=2"],
    "increlora": ["method.target_r=4", "method.add_per_round=2", "method.delta_t=1", "method.tinit=1"],
    "lamda_plus": ["method.rank=2"],
    "rslora": ["method.rank=16"],
    "alignguard_lora": [
        "method.alignguard_samples=4",
        "method.alignguard_top_k=2",
    ],  # a smaller Fisher estimate  # the preset's r=64 exceeds tiny_bert's width 32 (the pre-flight refuses it)
}
RESUMABLE = sorted(set(PRESETS) - CUDA_ONLY - NEEDS_EXPERTS)  # X-LoRA: test_xlora_resumes_exactly below
# The default run resumes every preset whose state goes beyond an adapter's tensors and AdamW's moments
# (an init, a procedure, a regularizer or another optimizer: each has its own checkpointed state), plus
# one representative of each way adapter tensors are kept: a peft adapter (lora), an own layer whose
# frozen part regenerates from the seed (sltrain), one with packed tensors (nola), one with frozen
# persistent factors (soma) and full fine-tuning. The other plain-adapter presets take the same
# checkpoint path; they run under ``-m slow`` (make test-slow), which keeps the default suite short.
REPRESENTATIVES = {"lora", "sltrain", "nola", "soma", "full"}


def plain_adapter(name: str) -> bool:
    raw = PRESETS[name]
    return all(
        str(raw.get(axis, "none")) in ("none", "adamw") for axis in ("init", "procedure", "regularizer", "optimizer")
    )


RESUME_CASES = [
    pytest.param(m, marks=pytest.mark.slow) if plain_adapter(m) and m not in REPRESENTATIVES else m for m in RESUMABLE
]


def interrupted_copy(run_dir: Path, root: Path, step: int) -> Path:
    """The run folder as an interruption after ``step`` leaves it: checkpoints up to ``step``, a
    canceled record, nothing written at the end of the run."""
    copy = root / run_dir.name
    shutil.copytree(run_dir, copy)
    for ckpt in list_checkpoints(copy):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    for done in ("adapter.safetensors", "peft_adapter", "model"):
        shutil.rmtree(copy / done, ignore_errors=True) if (copy / done).is_dir() else (copy / done).unlink(True)
    record = json.loads((copy / "record.json").read_text())
    record.update(status="canceled", error={"type": "RunCanceled", "message": "test", "step": step})
    (copy / "record.json").write_text(json.dumps(record))
    return copy


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name}"


def assert_same_state(a, b, where: str) -> None:
    """Optimizer state dicts (nested dicts, lists, tensors, numbers) are equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


# what the last segment of a run did rather than what the run is: a resumed LoRA-GA run finds the
# gradient estimate the first segment cached
SEGMENT_KEYS = ("lora_ga_gradient_cache", "lora_ga_batches")


def without_segment_keys(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in SEGMENT_KEYS}


def assert_resumed_exactly(a_dir: Path, b_dir: Path) -> None:
    a, b = (json.loads((d / "record.json").read_text()) for d in (a_dir, b_dir))
    assert b["status"] == "completed", b.get("error")
    assert [r["step"] for r in b["resumed_from"]][-1] == CUT
    assert a["history"] == b["history"] and len(a["history"]) == 2
    assert a["train_log"] == b["train_log"]
    assert a["metrics"]["final"] == b["metrics"]["final"]
    assert without_segment_keys(a["method_report"]) == without_segment_keys(b["method_report"])
    last_a, last_b = list_checkpoints(a_dir)[-1], list_checkpoints(b_dir)[-1]
    assert last_a.name == last_b.name == "step_6"
    assert_same_tensors(
        load_file(str(last_a / "trainable.safetensors")), load_file(str(last_b / "trainable.safetensors")), "weights"
    )
    assert_same_state(
        torch.load(last_a / "optimizer.pt", weights_only=True),
        torch.load(last_b / "optimizer.pt", weights_only=True),
        "optimizer",
    )
    for name in ("procedure.json", "scheduler.json"):
        if (last_a / name).exists():
            assert json.loads((last_a / name).read_text()) == json.loads((last_b / name).read_text()), name
    if (a_dir / "adapter.safetensors").exists():
        assert_same_tensors(
            load_file(str(a_dir / "adapter.safetensors")), load_file(str(b_dir / "adapter.safetensors")), "adapter"
        )


def resume_pair(method_args: list[str], kind: str, data: Path, tmp: Path) -> tuple[Path, Path]:
    def args(root: Path) -> list[str]:
        base = [a for a in tiny_overrides(kind, data, root) if not a.startswith("train.max_steps")]
        return [*method_args, *base, *STEPS]

    assert train(*args(tmp / "a")) == 0
    a_dir = only_run_dir(tmp / "a")
    b_dir = interrupted_copy(a_dir, tmp / "b", CUT)
    assert train(*args(tmp / "b"), "resume=auto") == 0
    return a_dir, b_dir


@pytest.mark.parametrize("method", RESUME_CASES)
def test_every_preset_resumes_exactly(method, sst2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))  # LoRA-GA's gradient cache
    a_dir, b_dir = resume_pair([f"method={method}", *MOVES.get(method, [])], "classification", sst2_dir, tmp_path)
    assert_resumed_exactly(a_dir, b_dir)
    report = json.loads((a_dir / "record.json").read_text())["method_report"]
    periods = report.get("lisa_periods") or report.get("badam_periods")
    if periods:  # layer-wise: a layer trained before the cut is frozen at it
        assert len({str(p.get("layers", p.get("block"))) for p in periods if p["start_step"] < CUT}) >= 2, periods


def test_xlora_resumes_exactly(gsm8k_dir, tmp_path):
    experts = []
    for seed in (0, 1):
        root = tmp_path / f"expert{seed}"
        assert train("method=lora", f"seed={seed}", *tiny_overrides("causal_lm", gsm8k_dir, root)) == 0
        experts.append(str(only_run_dir(root)))
    method_args = ["method=xlora", f"method.experts=[{','.join(experts)}]"]
    a_dir, b_dir = resume_pair(method_args, "causal_lm", gsm8k_dir, tmp_path)
    assert_resumed_exactly(a_dir, b_dir)
