"""Checks of ``protocol=compose`` that span config groups, torch-free: lorabench.protocols.checks
calls :func:`check_compose` from validation, before anything heavy loads."""

from __future__ import annotations

from lorabench.config import RunConfig
from lorabench.errors import ConfigError

QUANTIZED_INITS = ("nf4", "loftq")  # a 4-bit base weight cannot take a merged update added to it


def check_compose(cfg: RunConfig, method) -> list[str]:
    """The task-list checks (lorabench.protocols.continual.check.check_task_list), then: two tasks or
    more; every merge exists; the method is peft's LoRA on a float base (its layers hold the A and B
    the merges read) without DoRA's magnitudes or a procedure; LoRA-LEGO's rank fits the units there
    are. ``method`` is the checked method. Returns the tasks' heads."""
    from lorabench.protocols.checks import not_plain_lora
    from lorabench.protocols.compose.merges import MERGES
    from lorabench.protocols.continual.check import check_task_list

    settings, where = cfg.protocol.compose, "protocol.compose"
    tasks = check_task_list(cfg)
    if len(settings.tasks) < 2:
        raise ConfigError(f"{where}.tasks={settings.tasks} has one task; composition needs two or more")
    for name in settings.merges:
        MERGES.get(name, where=f"{where}.merges entry")
    params = method.params.get("adapter")
    kind = not_plain_lora(method)
    if kind:
        raise ConfigError(
            f"protocol=compose merges peft LoRA experts (their A and B); method {method.label!r} has {kind}; "
            f"use a LoRA method (e.g. method=lora, rslora, pissa, olora)"
        )
    init = method.names.get("init", "none")
    if init in QUANTIZED_INITS:
        raise ConfigError(
            f"protocol=compose adds each merged update to the base weights, which method {method.label!r} "
            f"(init {init!r}) quantizes to 4 bits; use a LoRA method on a float base (e.g. method=lora)"
        )
    procedure = method.names.get("procedure", "none")
    if procedure != "none":
        raise ConfigError(
            f"protocol=compose trains each expert as a plain stage; method {method.label!r} has procedure "
            f"{procedure!r}, whose schedule spans the run; use a method without one"
        )
    if "lego" in settings.merges and settings.lego_rank is not None:
        units = len(settings.tasks) * params.rank
        if settings.lego_rank > units:
            raise ConfigError(
                f"{where}.lego_rank={settings.lego_rank} exceeds the {units} rank-1 units of the experts "
                f"({len(settings.tasks)} tasks x rank {params.rank}) per layer; use 1..{units}"
            )
    return [t.head for t in tasks]
