"""Cost measurements: parameters, optimizer-state bytes, peak memory and provenance."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import torch
from torch import nn

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "galore-torch", "lorabench")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    from lorabench.distributed import full_numel

    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += full_numel(p)
        trainable += full_numel(p) if p.requires_grad else 0
    return trainable, total


def _tensors_in(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
        for item in vars(value).values():  # e.g. a projector object holding its matrices
            yield from _tensors_in(item, depth + 1)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state, including tensors held by objects
    stored there (GaLore projectors) and by an ``extra_state_tensors()`` method if it has one.
    Each storage is counted once; a sharded tensor (FSDP2's ``DTensor``) counts this process's shard.
    Under DeepSpeed ZeRO the state is of this process's flat partitions, and the fp32 master copy of
    those partitions that ZeRO's optimizer keeps beside the weights counts too."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    seen, total = set(), 0
    sources = [inner.state]
    if hasattr(inner, "extra_state_tensors"):
        sources.append(list(inner.extra_state_tensors()))
    for masters in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        sources.append(list(getattr(inner, masters, None) or []))
    for source in sources:
        for tensor in _tensors_in(source):
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            key = (tensor.untyped_storage().data_ptr(), tensor.device)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


class PeakMemory:
    """Peak RSS sampled by a background thread (per run, unlike ru_maxrss), and CUDA peaks."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
        out = {"cpu_peak_rss_bytes": self.peak_rss, "cuda_allocated_bytes": None, "cuda_reserved_bytes": None}
        if torch.cuda.is_available():
            out["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "versions": versions,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
