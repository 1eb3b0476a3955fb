"""Protocols: how a run's training is organised (``protocol=`` in the config).

``single`` is one model on one dataset (lorabench.train.train_single); ``federated`` trains over
simulated clients on Flower (lorabench.protocols.federated); ``continual`` trains a task sequence
and measures forgetting (lorabench.protocols.continual); ``compose`` trains one expert per task and
merges them (lorabench.protocols.compose); ``compressed`` trains on a quantized or pruned base
(lorabench.protocols.compressed). Each is a *body* that
lorabench.train.run_with_record runs inside the run's record, built from the loop's pieces
(build_run_parts, prepare_run, train_steps, evaluate, finish_record).
"""

from __future__ import annotations

from typing import Callable

from lorabench.registry import Registry

PROTOCOLS: Registry = Registry("protocol")


def _single(session) -> None:
    from lorabench.train import train_single

    train_single(session)


def _federated(session) -> None:
    from lorabench.protocols.federated.protocol import train_federated

    train_federated(session)


def _continual(session) -> None:
    from lorabench.protocols.continual.protocol import train_continual

    train_continual(session)


def _compose(session) -> None:
    from lorabench.protocols.compose.protocol import train_compose

    train_compose(session)


def _compressed(session) -> None:
    from lorabench.protocols.compressed.protocol import train_compressed

    train_compressed(session)


PROTOCOLS.register("single")(_single)
PROTOCOLS.register("federated")(_federated)
PROTOCOLS.register("continual")(_continual)
PROTOCOLS.register("compose")(_compose)
PROTOCOLS.register("compressed")(_compressed)


def body_for(name: str) -> Callable:
    """The run body of protocol ``name`` (a ConfigError naming the valid choices otherwise)."""
    return PROTOCOLS.get(name, where="protocol")
