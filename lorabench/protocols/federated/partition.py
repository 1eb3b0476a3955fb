"""How the training examples are split over federated clients.

``iid``: a seeded shuffle cut into ``clients`` nearly equal parts. ``dirichlet``: label-skewed
non-IID clients as in Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", arXiv:1909.06335): for each class, the proportions of its
examples going to each client are drawn from Dir(alpha · 1); small alpha gives clients dominated by
one class. Both depend only on the seed, so every process (server and clients) computes the same
partition.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np

from lorabench.errors import ConfigError
from lorabench.registry import Registry

PARTITIONS = Registry("partition")


@PARTITIONS.register("iid")
def iid(labels: list, clients: int, seed: int, alpha: float) -> list[list[int]]:
    """A seeded permutation of the example indices cut into ``clients`` nearly equal parts."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


@PARTITIONS.register("dirichlet")
def dirichlet(labels: list, clients: int, seed: int, alpha: float) -> list[list[int]]:
    """Per class, a Dir(alpha) draw splits that class's (shuffled) examples over the clients."""
    rng = np.random.default_rng(seed)
    by_class: dict = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted(by_class, key=str):
        members = rng.permutation(by_class[label])
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def partition(labels: list, clients: int, scheme: str, seed: int, alpha: float, min_size: int) -> list[list[int]]:
    """The example indices of every client under ``scheme``; a ConfigError when a client gets fewer
    than ``min_size`` examples (one micro-batch), naming the client and what to change."""
    split: Callable = PARTITIONS.get(scheme, where="protocol.federated.partition")
    parts = split(labels, clients, seed, alpha)
    for client, part in enumerate(parts):
        if len(part) < min_size:
            raise ConfigError(
                f"protocol.federated: client {client} gets {len(part)} training examples under "
                f"partition={scheme} (alpha {alpha}), fewer than one micro-batch ({min_size}); use fewer "
                "clients, a larger dirichlet_alpha or more training examples"
            )
    return parts


def label_of(example: dict):
    """The class an example counts as for the Dirichlet split (GLUE's ``label``; else one class)."""
    return example.get("label", 0)
