"""Which component names exist on each method axis, their ``Params`` and what adapter they need.

A second registry beside ``lorabench.registry.ADAPTERS`` etc., torch-free: it holds no component,
only the declaration a config is checked against. Every component registers here too, the ones
without hyper-parameters with :class:`NoParams`, so an unknown name is refused with the valid
choices before torch loads. ``tests/test_method_params.py`` keeps the two registries equal: the same
names, ``component.Params is entry.params`` and the same ``requires_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lorabench.registry import Registry

AXIS_NAMES = ("adapter", "init", "optimizer", "procedure", "regularizer")  # the method config keys, in check order


@dataclass(frozen=True)
class ParamsEntry:
    params: type  # the Params dataclass
    # adapter names the component works with ("none": only without an adapter); empty: any adapter
    requires_adapter: tuple[str, ...] = ()
    # "any": runs on FSDP2 shards (elementwise on parameters and gradients, or acting only in the
    # forward); otherwise why it needs whole tensors, which hardware.strategy=fsdp refuses with
    # (lorabench.distributed, ``lorabench methods --strategies``)
    sharding: str = "any"
    # the same for hardware.strategy=ddp on more than one process: "any", or why DDP cannot run it
    ddp: str = "any"
    # the same for DeepSpeed ZeRO (hardware.strategy=zero2 and zero3; zero3 also refuses what ``sharding``
    # names): "any", or why not; the ZERO_* reasons below name the usual ones
    zero: str = "any"


# Why a component cannot run under DeepSpeed ZeRO (lorabench.distributed): its engine keeps its own fp32
# partition of every trainable weight, hands the optimizer flat 1-D partitions, fixes the partitions
# when the model is prepared, and steps inside the backward of the step's last micro-batch.
ZERO_NEEDS_MATRICES = "works on each weight's gradient as a matrix, but ZeRO hands the optimizer flat 1-D partitions"
ZERO_BETWEEN_BACKWARD_AND_STEP = (
    "acts on gradients between the backward and the update, which ZeRO applies inside the backward"
)
ZERO_WRITES_WEIGHTS = (
    "changes weights in place between steps, which ZeRO's fp32 partition overwrites at the next update"
)
ZERO_MOVES_TRAINABLE = "changes which parameters train during the run, while ZeRO fixes its partitions at prepare"


@dataclass
class NoParams:
    """For components without hyper-parameters."""


PARAMS: dict[str, Registry] = {
    "adapter": Registry("adapter"),
    "init": Registry("initializer"),
    "optimizer": Registry("optimizer"),
    "procedure": Registry("procedure"),
    "regularizer": Registry("regularizer"),
}


def params_for(
    axis: str,
    name: str,
    requires_adapter: tuple[str, ...] = (),
    sharding: str = "any",
    ddp: str = "any",
    zero: str = "any",
) -> Callable[[type], type]:
    """Class decorator: ``cls`` declares the hyper-parameters of component ``name`` on ``axis``
    (stack it for a class two components share); returns ``cls`` unchanged."""

    def decorator(cls: type) -> type:
        PARAMS[axis].register(name)(ParamsEntry(cls, tuple(requires_adapter), sharding, ddp, zero))
        return cls

    return decorator


def entry(axis: str, name: str) -> ParamsEntry:
    """The registered entry; an unknown name raises ``ConfigError`` naming ``method.<axis>`` and the
    valid choices."""
    return PARAMS[axis].get(name, where=f"method.{axis}")
