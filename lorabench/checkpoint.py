"""Checkpoints that let a run resume exactly where it stopped.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<N>/`` holding:
  trainable.safetensors   every trainable tensor (by parameter name of the unwrapped model)
  optimizer.pt            optimizer state dict (tensors and plain values only; loaded weights_only)
  scheduler.json          LR scheduler state
  procedure.json          state of the training procedure (LISA's active layers, ...), if any
  regularizer.pt          state of the regularizer (e.g. a running gradient-norm average), if any
  rng_<rank>.pt           python, numpy and torch (CPU and CUDA) RNG states of each process
  meta.json               step, batches consumed, history, train log, best, timers
  manifest.json           size and sha256 of every file above; written last

It is written into a staging folder unique to the writing process (``.staging_step_<N>-<host>-<pid>-
<tag>``) and renamed, so a crash while writing leaves the previous checkpoint intact; only folders with
``meta.json`` or ``manifest.json`` count. On resume (:func:`newest_usable`) every file is checked
against the manifest and read before anything is applied; a checkpoint with a missing, truncated or
corrupt file is named (file and reason), skipped with a warning, and the next older one is tried.
Frozen weights are not stored: on resume the run rebuilds the model and re-runs the method's
(deterministic) initializer, then loads the trainable tensors. Nothing is unpickled: tensors load with
safetensors or ``weights_only=True``.

A sharded run (``hardware.strategy=fsdp``) writes the same files: the trainable tensors and the
optimizer state are gathered whole (torch.distributed.checkpoint's full state dicts, every process
taking part) and written by rank 0, the optimizer state keyed by parameter name; on resume each
process loads the whole tensors and keeps its shard (``set_model_state_dict`` /
``set_optimizer_state_dict``), so the checkpoint is independent of the number of processes.

A DeepSpeed ZeRO-2 run (``zero2``; ZeRO-3 runs are refused a checkpoint) writes the whole
trainable tensors and, from every process, ``optimizer_<rank>.pt``: the state of its own flat partition as the
optimizer inside DeepSpeed's holds it (``optimizer.pt`` then only says so). On resume each process
loads the tensors, its partition's state, and DeepSpeed's fp32 master partition is refreshed from
the loaded weights; it resumes with the same number of processes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorabench.distributed import zero_optimizer

META = "meta.json"
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with ``meta.json`` or ``manifest.json``), oldest first; whether their
    files are intact is checked on resume (:func:`newest_usable`)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / META).is_file() or (p / MANIFEST).is_file()]
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
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if every_parameter or p.requires_grad}


def _staging_name(step: int, accelerator) -> str:
    """A staging folder name unique to this process group (rank 0's host, pid and a random tag),
    agreed by every rank."""
    name = [f".staging_step_{step}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        name = broadcast_object_list(name, from_process=0)
    return name[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: size and sha256 of every other file of the checkpoint (written last)."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    _write_json(folder / MANIFEST, {"format": 1, "files": files})


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    procedure,
    meta: dict,
    accelerator,
    keep: int,
    regularizer=None,
) -> Path | None:
    """Every process saves its RNG state; rank 0 writes the rest and the manifest, and renames the
    folder into place. The caller holds the run's lock (lorabench.run_lock), so staging folders of
    other processes found here are leftovers of dead ones and are removed; a failed save removes its
    own staging folder and leaves the previous checkpoints as they were."""
    root = checkpoint_dir(run_dir)
    staging = root / _staging_name(step, accelerator)
    if accelerator.is_main_process:
        for leftover in root.glob(".staging_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    target = root / f"step_{step}"
    try:
        torch.save(_rng_state(), staging / f"rng_{accelerator.process_index}.pt")
        zero = zero_optimizer(optimizer)
        if zero is not None:  # this process's partition of the optimizer state
            torch.save(zero.optimizer.state_dict(), staging / f"optimizer_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        every_parameter = bool(getattr(procedure, "moves_trainable_set", False))
        tensors, optimizer_state = _states_to_save(unwrapped, optimizer, every_parameter)  # collective when sharded
        if accelerator.is_main_process:
            save_file(tensors, str(staging / "trainable.safetensors"))
            torch.save(optimizer_state, staging / "optimizer.pt")
            (staging / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=str))
            if procedure is not None:
                (staging / "procedure.json").write_text(json.dumps(procedure.state_dict()))
            if regularizer is not None:
                torch.save(regularizer.state_dict(), staging / "regularizer.pt")
            _write_json(staging / META, {**meta, "step": step})
            write_manifest(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


# -- resume ---------------------------------------------------------------------------------------
def _states_to_save(model, optimizer, every_parameter: bool) -> tuple[dict, dict]:
    """(trainable tensors, optimizer state dict) as rank 0 writes them. A sharded model's come whole
    from torch.distributed.checkpoint (every process must call this; the others get empty dicts)."""
    from lorabench.distributed import is_sharded

    if zero_optimizer(optimizer) is not None:  # ZeRO-2: whole weights; each process wrote its partition's state
        return trainable_tensors(model, every_parameter), {"zero_partitions": "optimizer_<rank>.pt"}
    if not is_sharded(model):
        return trainable_tensors(model, every_parameter), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    kept = {n for n, p in model.named_parameters() if every_parameter or p.requires_grad}
    whole = get_model_state_dict(model, options=options)
    tensors = {n: t.contiguous() for n, t in whole.items() if n in kept}
    return tensors, get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def _load_sharded(model, optimizer, tensors: dict, optimizer_state: dict) -> None:
    """Each process keeps its shard of the whole tensors and optimizer state a checkpoint holds."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, optimizer_state, options=StateDictOptions(full_state_dict=True))


def _load_zero(model, optimizer, tensors: dict, partition_state: dict) -> None:
    """A ZeRO-2 run's resume: the whole trainable tensors into the weights, this process's partition
    state into the optimizer inside DeepSpeed's, and DeepSpeed's fp32 master partition refreshed from
    the loaded weights."""
    zero = zero_optimizer(optimizer)
    if zero is None:
        raise ValueError("the checkpoint was written under DeepSpeed ZeRO-2; resume with hardware.strategy=zero2")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    zero.optimizer.load_state_dict(partition_state)
    zero.refresh_fp32_params()


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def verify_checkpoint(path: Path) -> bool:
    """Check every file against ``manifest.json`` (presence, size, sha256). True when verified,
    False for a checkpoint written before manifests existed. Raises CheckpointError."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, {MANIFEST} says {expected['bytes']} (truncated or rewritten)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from {MANIFEST} (corrupt)")
    return True


def _read(path: Path, name: str, reader):
    """``reader(path / name)``, any failure raised as a CheckpointError that names the file."""
    file = path / name
    if not file.exists():
        raise CheckpointError(f"{file}: missing")
    try:
        return reader(file)
    except Exception as exc:  # noqa: BLE001 - every reader's own error, with the file it concerns
        raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None


def _json(file: Path):
    return json.loads(file.read_text())


def _torch(file: Path):
    return torch.load(file, weights_only=True, map_location="cpu")


@dataclass
class Checkpoint:
    """Everything one process needs from a checkpoint, read (and verified) before any of it is applied."""

    path: Path
    tensors: dict
    optimizer: dict
    scheduler: dict
    procedure: dict | None
    meta: dict
    rng: dict
    verified: bool
    regularizer: dict | None = None


def read_checkpoint(path: Path, process_index: int) -> Checkpoint:
    """Verify and read a checkpoint; raises CheckpointError naming the first bad file."""
    verified = verify_checkpoint(path)
    rng_name = f"rng_{process_index}.pt"
    if not (path / rng_name).exists():
        raise CheckpointError(
            f"{path / rng_name}: missing; the checkpoint has no RNG state for process {process_index} "
            "(resume with the same number of processes)"
        )
    meta = _read(path, META, _json)
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path / META}: no 'step' in it")
    optimizer = _read(path, "optimizer.pt", _torch)
    if isinstance(optimizer, dict) and "zero_partitions" in optimizer:  # DeepSpeed ZeRO: one file per process
        name = f"optimizer_{process_index}.pt"
        if not (path / name).exists():
            raise CheckpointError(
                f"{path / name}: missing; a ZeRO checkpoint holds one optimizer partition per process "
                "(resume with the same number of processes)"
            )
        optimizer = {"zero_partition": _read(path, name, _torch)}
    return Checkpoint(
        path=path,
        tensors=_read(path, "trainable.safetensors", lambda f: load_file(str(f))),
        optimizer=optimizer,
        scheduler=_read(path, "scheduler.json", _json),
        procedure=_read(path, "procedure.json", _json) if (path / "procedure.json").exists() else None,
        meta=meta,
        rng=_read(path, rng_name, _torch),
        verified=verified,
        regularizer=_read(path, "regularizer.pt", _torch) if (path / "regularizer.pt").exists() else None,
    )


def newest_usable(run_dir: Path, process_index: int, warn: bool = True) -> tuple[Checkpoint | None, list[dict]]:
    """The newest checkpoint that verifies and reads, and the newer ones skipped ({checkpoint,
    problem}), each announced with a warning. (None, []) when there is none; raises CheckpointError
    when checkpoints exist but none is usable (delete them or use resume=never to start over)."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path, process_index), skipped
        except CheckpointError as exc:
            skipped.append({"checkpoint": str(path), "problem": str(exc)})
            if warn:
                print(f"[lorabench] WARNING skipping checkpoint {path.name}: {exc}", file=sys.stderr)
    if skipped:
        raise CheckpointError(
            f"no usable checkpoint in {checkpoint_dir(run_dir)}: "
            + "; ".join(s["problem"] for s in skipped)
            + " (delete the folder, or set resume=never, to start the run over)"
        )
    return None, skipped


def load_checkpoint(
    checkpoint: Checkpoint, *, model, optimizer, scheduler, procedure, accelerator, regularizer=None
) -> dict:
    """Restore weights, optimizer, scheduler, procedure and regularizer from a read checkpoint; returns its meta.
    RNG states are restored separately by :func:`restore_rng`, once the data has been fast-forwarded."""
    from lorabench.distributed import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    tensors, path = checkpoint.tensors, checkpoint.path
    params = dict(unwrapped.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable tensors {missing[:5]}; was it written by another method?")
    try:
        if "zero_partition" in checkpoint.optimizer:
            _load_zero(unwrapped, optimizer, tensors, checkpoint.optimizer["zero_partition"])
        elif is_sharded(unwrapped):
            _load_sharded(unwrapped, optimizer, tensors, checkpoint.optimizer)
        else:
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value.to(params[name].device))
            optimizer.load_state_dict(checkpoint.optimizer)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path / 'optimizer.pt'} does not fit this run's optimizer: {exc}") from None
    scheduler.load_state_dict(checkpoint.scheduler)
    if procedure is not None and checkpoint.procedure is not None:
        procedure.load_state_dict(checkpoint.procedure)
    if regularizer is not None and checkpoint.regularizer is not None:
        regularizer.load_state_dict(checkpoint.regularizer)
    return checkpoint.meta


def restore_rng(checkpoint: Checkpoint) -> None:
    """Set this process's RNG states to the checkpoint's (call after fast-forwarding the data)."""
    _set_rng_state(checkpoint.rng)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
