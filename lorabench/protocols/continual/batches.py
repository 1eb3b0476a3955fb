"""A stage's training micro-batches: the current task's examples, with replayed ones mixed in.

The stream is endless and fixed by the stage's seed: the current task's features in shuffled
epochs (``torch.randperm`` on a generator seeded with the stage seed, reshuffled every epoch) and,
when a replay buffer is given, ``r_t`` examples of it in micro-batch ``t`` drawn uniformly without
replacement (``random.Random(stage seed)``), where ``r_t = floor((t+1) q m) - floor(t q m)`` for
replay ratio ``q`` and micro-batch ``m``: over any run of micro-batches the replayed share is ``q``
to within one example, and every micro-batch keeps ``m`` rows (the global batch is unchanged).
With several processes each draw is made for every process in turn and each keeps its own, so the
stream does not depend on the process count's sharding of a loader.

The replay buffer (Rebuffi et al., 2017; Chaudhry et al., 2019, "On Tiny Episodic Memories in
Continual Learning", arXiv:1902.10486) holds ``replay_size`` examples of each finished task, chosen
uniformly without replacement from its training split with the task's own seed
(:func:`replay_indices`); the indices are what the protocol checkpoint keeps.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any, Callable

import torch


def derived_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed for one purpose of one stage (``derived_seed(seed, "stage", 2)``): distinct for
    every run seed and purpose, the same on every machine."""
    text = ":".join(str(p) for p in ("continual", seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def replay_indices(n_train: int, size: int, seed: int) -> list[int]:
    """``size`` indices of a training split of ``n_train`` examples (all when it is smaller), sorted."""
    return sorted(random.Random(seed).sample(range(n_train), min(size, n_train)))


def replay_count(draw: int, micro: int, ratio: float) -> int:
    """How many of micro-batch ``draw``'s ``micro`` rows are replayed at replay ratio ``ratio``."""
    share = ratio * micro
    return math.floor((draw + 1) * share + 1e-9) - math.floor(draw * share + 1e-9)


class StageBatches:
    """Endless collated micro-batches of one stage for process ``rank`` of ``world`` (see the module
    docstring). ``replay`` is a list of ``(task_index, feature)``; each batch's rows are the current
    task's first, the replayed after. ``on_batch(batch, task_ids, replay_rows)`` is called with every
    batch before it is handed out (the head selector and the strategy read it)."""

    def __init__(
        self,
        features: list[dict],
        task_index: int,
        collate_fn: Callable[[list[dict]], dict],
        *,
        micro: int,
        seed: int,
        device: Any,
        replay: list[tuple[int, dict]] = (),
        ratio: float = 0.0,
        rank: int = 0,
        world: int = 1,
        on_batch: Callable[[dict, torch.Tensor, list[int]], None] | None = None,
    ):
        self.features, self.task_index, self.collate_fn = features, task_index, collate_fn
        self.micro, self.device, self.replay = micro, device, list(replay)
        self.ratio = ratio if self.replay else 0.0
        self.rank, self.world, self.on_batch = rank, world, on_batch
        self.order = torch.Generator().manual_seed(seed)
        self.pick = random.Random(seed)
        self.permutation: list[int] = []
        self.draws = 0

    def __iter__(self) -> "StageBatches":
        return self

    def _next_current(self) -> dict:
        if not self.permutation:
            self.permutation = torch.randperm(len(self.features), generator=self.order).tolist()[::-1]
        return self.features[self.permutation.pop()]

    def _draw(self) -> tuple[list[dict], list[int]]:
        n_replay = min(replay_count(self.draws, self.micro, self.ratio), len(self.replay))
        rows = [self._next_current() for _ in range(self.micro - n_replay)]
        ids = [self.task_index] * len(rows)
        for task, feature in self.pick.sample(self.replay, n_replay):
            rows.append(feature)
            ids.append(task)
        self.draws += 1
        return rows, ids

    def __next__(self) -> dict:
        for process in range(self.world):
            rows, ids = self._draw()
            if process == self.rank:
                mine = (rows, ids)
        rows, ids = mine
        batch = {k: v.to(self.device) for k, v in self.collate_fn(rows).items()}
        task_ids = torch.tensor(ids)
        if self.on_batch is not None:
            self.on_batch(batch, task_ids, [i for i, t in enumerate(ids) if t != self.task_index])
        return batch
