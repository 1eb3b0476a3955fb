"""Apply a resolved method to a model: initializer -> adapter -> optimizer -> procedure -> regularizer.

Shared by the training loop and the tests, so both exercise exactly the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext, rank_limit
from lorabench.methods.spec import MethodSpec


@dataclass
class BuiltMethod:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    procedure: Any | None  # a Procedure instance, or None
    regularizer: Any | None = None  # a Regularizer instance, or None


def check_rank_fits(model: nn.Module, spec: MethodSpec, ctx: MethodContext) -> None:
    """Before any calibration pass: a rank the SVD-based components cannot take on some target is a
    ConfigError naming the target and the valid range (peft would fail later with a shape mismatch)."""
    rank = getattr(spec.params.get("adapter"), "rank", None)
    limit = rank_limit(model, spec.components.values(), ctx.target_modules)
    if rank is None or limit is None or rank <= limit[0]:
        return
    most, name, shape = limit
    raise ConfigError(
        f"method.rank={rank} is too large for method {spec.label!r} on this model: valid choices are 1..{most} "
        f"(its factors are singular vectors of every target weight or gradient; the smallest, {name}, is {shape})"
    )


def apply_method(model: nn.Module, spec: MethodSpec, ctx: MethodContext) -> BuiltMethod:
    init, adapter = spec.components.get("init"), spec.components.get("adapter")
    check_rank_fits(model, spec, ctx)
    if init:
        init.before_adapter(model, spec.params["init"], ctx)
    if adapter:
        init_kwargs = init.adapter_kwargs(spec.params["init"]) if init else {}
        model = adapter.apply(model, spec.params["adapter"], ctx, init_kwargs)
    if init:
        init.after_adapter(model, spec.params["init"], ctx)
    optimizer = spec.components["optimizer"].build(model, spec.params["optimizer"], ctx)
    procedure = spec.components.get("procedure")
    if procedure:
        procedure.setup(model, optimizer, spec.params["procedure"], ctx)
    regularizer = spec.components.get("regularizer")
    if regularizer:
        regularizer.setup(model, optimizer, spec.params["regularizer"], ctx)
    return BuiltMethod(model, optimizer, procedure, regularizer)


def expected_trainable(base_model: nn.Module, spec: MethodSpec, ctx: MethodContext) -> int | None:
    """The method's closed-form trainable-parameter count on ``base_model`` (before it is wrapped):
    the procedure's or the adapter's ``expected_trainable``; without either, every parameter trains."""
    procedure = spec.components.get("procedure")
    formula = getattr(procedure, "expected_trainable", None)
    if formula is not None:  # layer-wise procedures train a subset from the start
        return formula(base_model, spec.params["procedure"], ctx)
    adapter = spec.components.get("adapter")
    if adapter is None:
        return sum(p.numel() for p in base_model.parameters())
    formula = getattr(adapter, "expected_trainable", None)
    return None if formula is None else formula(base_model, spec.params["adapter"], ctx)
