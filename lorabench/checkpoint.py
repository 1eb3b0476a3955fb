"""Checkpoints that let a run resume exactly where it stopped.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<N>/`` holding:
  trainable.safetensors   every trainable tensor (by parameter name of the unwrapped model)
  optimizer.pt            optimizer state dict (tensors and plain values only; loaded weights_only)
  scheduler.json          LR scheduler state
  procedure.json          state of the training procedure (LISA's active layers, ...), if any
  rng_<rank>.pt           python, numpy and torch (CPU and CUDA) RNG states of each process
  meta.json               step, batches consumed, history, train log, best, timers; written last

It is written into a temporary folder and renamed, so a crash while writing leaves the previous
checkpoint intact; only folders with ``meta.json`` count. Frozen weights are not stored: on resume
the run rebuilds the model and re-runs the method's (deterministic) initializer, then loads the
trainable tensors. Nothing is unpickled: tensors load with safetensors or ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

META = "meta.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Valid checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, keys, *rest = state["numpy"]
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((version, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model: torch.nn.Module, every_parameter: bool = False) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: those that train now, or every parameter when the trainable
    set moves during the run (LISA, BAdam: layers trained earlier are frozen at save time)."""
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if every_parameter or p.requires_grad
    }


def save_checkpoint(
    run_dir: Path, step: int, *, model, optimizer, scheduler, procedure, meta: dict, accelerator, keep: int
) -> Path | None:
    """Every process saves its RNG state; rank 0 writes the rest and renames the folder into place."""
    root = checkpoint_dir(run_dir)
    staging = root / f".staging_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    target = root / f"step_{step}"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        every_parameter = bool(getattr(procedure, "moves_trainable_set", False))
        save_file(trainable_tensors(unwrapped, every_parameter), str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=str))
        if procedure is not None:
            (staging / "procedure.json").write_text(json.dumps(procedure.state_dict()))
        _write_json(staging / META, {**meta, "step": step})
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(path: Path, *, model, optimizer, scheduler, procedure, accelerator) -> dict:
    """Restore weights, optimizer, scheduler and procedure; returns the meta dict. RNG states are
    restored separately by :func:`restore_rng`, once the data iterator has been fast-forwarded."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(unwrapped.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable tensors {missing[:5]}; was it written by another method?")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if procedure is not None and (path / "procedure.json").exists():
        procedure.load_state_dict(json.loads((path / "procedure.json").read_text()))
    return json.loads((path / META).read_text())


def restore_rng(path: Path, accelerator) -> None:
    """Set this process's RNG states to the checkpoint's (call after fast-forwarding the data)."""
    rng = path / f"rng_{accelerator.process_index}.pt"
    if not rng.exists():
        raise ValueError(
            f"checkpoint {path} has no RNG state for process {accelerator.process_index}; "
            "resume with the same number of processes"
        )
    _set_rng_state(torch.load(rng, weights_only=True))


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
