"""The continual protocol's checkpoint: one folder per finished stage, so that ``resume=auto``
continues an interrupted run at the next stage with the numbers an uninterrupted run gets.

Granularity is the stage boundary: a run stopped inside stage ``k`` restarts stage ``k`` from its
start (the stage's optimizer state and schedule are fresh and its randomness is seeded from the run
seed and the stage, so nothing inside a stage needs saving). ``<run_dir>/continual/stage_<k>/`` holds

  trainable.safetensors   every trainable tensor of the unwrapped model (adapter and every task head)
  strategy.safetensors    the strategy's tensors (I-LoRA's slow copy), if any
  procedure.json          the method's procedure state (LISA's layers, ...), if any
  state.json              the stage index, the stages' scores, the replay buffer's indices, the
                          training state (step, tokens, history, train log, training time) and the
                          strategy's state
  manifest.json           size and sha256 of every file above (lorabench.checkpoint), written last

written into a staging folder and renamed (a crash leaves the previous stage's folder intact); on
resume every file is checked against the manifest, and a broken folder is named, skipped and the
next older one tried. Only the newest ``checkpoint.keep`` folders are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from lorabench.checkpoint import CheckpointError, trainable_tensors, verify_checkpoint, write_manifest

FOLDER = "continual"
STATE = "state.json"


def stage_dirs(run_dir: Path) -> list[Path]:
    """Complete stage folders (with ``state.json``), oldest first."""
    root = run_dir / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.glob("stage_*") if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_stage(run_dir: Path, stage: int, *, model, strategy, procedure, state: dict, accelerator, keep: int) -> Path:
    """Write stage ``stage``'s folder (main process), atomically; prune older ones."""
    root = run_dir / FOLDER
    target = root / f"stage_{stage}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".staging_*"):  # the run's lock is held: these are a dead process's
            shutil.rmtree(leftover, ignore_errors=True)
        staging = root / f".staging_stage_{stage}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            unwrapped = accelerator.unwrap_model(model)
            every = bool(getattr(procedure, "moves_trainable_set", False))
            save_file(trainable_tensors(unwrapped, every), str(staging / "trainable.safetensors"))
            extra = strategy.tensors()
            if extra:
                save_file(extra, str(staging / "strategy.safetensors"))
            if procedure is not None:
                (staging / "procedure.json").write_text(json.dumps(procedure.state_dict()))
            (staging / STATE).write_text(json.dumps({**state, "stage": stage}, default=str))
            write_manifest(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in stage_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


@dataclass
class StageCheckpoint:
    path: Path
    state: dict
    tensors: dict
    strategy: dict
    procedure: dict | None
    verified: bool


def read_stage(path: Path) -> StageCheckpoint:
    """Verify and read one stage folder; raises CheckpointError naming the bad file."""
    verified = verify_checkpoint(path)
    try:
        state = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / "trainable.safetensors"))
        strategy = load_file(str(path / "strategy.safetensors")) if (path / "strategy.safetensors").exists() else {}
        procedure = json.loads((path / "procedure.json").read_text()) if (path / "procedure.json").exists() else None
    except Exception as exc:  # noqa: BLE001 - any unreadable file, named
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    return StageCheckpoint(path, state, tensors, strategy, procedure, verified)


def newest_stage(run_dir: Path, warn: bool = True) -> tuple[StageCheckpoint | None, list[dict]]:
    """The newest stage folder that verifies and reads, and the newer ones skipped
    ({checkpoint, problem}); (None, skipped) when there is none."""
    skipped = []
    for path in reversed(stage_dirs(run_dir)):
        try:
            return read_stage(path), skipped
        except CheckpointError as exc:
            skipped.append({"checkpoint": str(path), "problem": str(exc)})
            if warn:
                print(f"[lorabench] WARNING skipping stage checkpoint {path.name}: {exc}", file=sys.stderr)
    return None, skipped


def load_weights(checkpoint: StageCheckpoint, model, accelerator) -> None:
    """The checkpoint's trainable tensors into the (unwrapped) model."""
    import torch

    params = dict(accelerator.unwrap_model(model).named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in checkpoint.tensors)
    unknown = sorted(set(checkpoint.tensors) - set(params))
    if missing or unknown:
        raise ValueError(
            f"stage checkpoint {checkpoint.path} does not fit this run's model "
            f"(missing {missing[:3]}, unknown {unknown[:3]}); was it written by another method?"
        )
    with torch.no_grad():
        for name, value in checkpoint.tensors.items():
            params[name].copy_(value.to(params[name].device))
