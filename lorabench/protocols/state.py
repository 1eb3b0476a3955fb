"""Checkpoints at a protocol's boundaries (after a federated round, after a continual stage).

``<run dir>/protocol_state/<name>_<index>/`` holds ``tensors.safetensors`` (what the protocol
needs to continue: the global arrays, the trained weights), ``state.json`` (its progress: round or
stage, the per-round/per-stage results) and the ``manifest.json`` of lorabench.checkpoint (size and
sha256 of each file). A folder is staged and renamed into place, so it is whole or absent; with
``resume=auto`` a protocol continues after the newest one that verifies. Older ones beyond ``keep``
are removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorabench.checkpoint import CheckpointError, verify_checkpoint, write_manifest

FOLDER = "protocol_state"


def _folders(run_dir: Path, name: str) -> list[Path]:
    root = Path(run_dir) / FOLDER
    found = [p for p in root.glob(f"{name}_*") if p.is_dir() and p.name.split("_")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]))


def save_protocol_state(
    run_dir: Path, name: str, index: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2
) -> Path:
    """Write ``<name>_<index>`` (staged, then renamed) and drop all but the newest ``keep``."""
    root = Path(run_dir) / FOLDER
    staging = root / f".staging_{name}_{index}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "tensors.safetensors"))
    (staging / "state.json").write_text(json.dumps(state, default=str))
    write_manifest(staging)
    target = root / f"{name}_{index}"
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    for old in _folders(run_dir, name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def newest_protocol_state(run_dir: Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of the newest ``<name>_*`` folder that verifies, or None; a broken newer
    one is reported and passed over."""
    for folder in reversed(_folders(run_dir, name)):
        try:
            if not verify_checkpoint(folder):
                raise CheckpointError(f"{folder}: no manifest")
            return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())
        except (CheckpointError, OSError, ValueError) as exc:
            print(f"[lorabench] protocol checkpoint passed over: {exc}")
    return None
