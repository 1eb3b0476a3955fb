"""LISA (Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
Model Fine-Tuning", arXiv:2403.17919), with adapter none and AdamW.

Every K steps: freeze all transformer layers, then unfreeze γ layers sampled uniformly without
replacement; everything outside the layer list (embeddings, final norm, pooler, LM/task head)
always trains. With period p = ⌊t / K⌋: trainable(t) = non-layer params ∪ {layer l : l ∈ S_p},
S_p ~ Uniform(γ-subsets of {0..L-1}). Full-parameter AdamW on the active set; the optimizer state
(exp_avg, exp_avg_sq, step) of layers that get re-frozen is deleted, so optimizer memory is that of
the active set only, and a layer sampled again starts with fresh moments. Sampling uses
``random.Random(seed)``, so a seed gives the same layer schedule.
Hyper-parameters: γ = ``lisa_activated_layers`` (LMFlow examples: 1-2; default 2) and K =
``lisa_interval_steps`` (LMFlow: 20); full-FT-like lr (~1e-5).
The layer list is found generically (``transformer_layers``): the ``nn.ModuleList`` holding the most
parameters (``bert.encoder.layer``, ``model.layers``, ``transformer.h``, ...).
Multi-process runs: changing ``requires_grad`` under DDP needs ``find_unused_parameters``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext, Procedure
from lorabench.registry import PROCEDURES


def transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the transformer blocks: the ModuleList with the most parameters."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ConfigError(f"found no nn.ModuleList of transformer layers in {type(model).__name__}")
    return best


def layer_parameters(model: nn.Module) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """Parameters per transformer layer, and every parameter outside the layer list."""
    _, layers = transformer_layers(model)
    per_layer = [list(layer.parameters()) for layer in layers]
    inside = {id(p) for ps in per_layer for p in ps}
    return per_layer, [p for p in model.parameters() if id(p) not in inside]


def set_trainable(params: list[nn.Parameter], on: bool, optimizer: torch.optim.Optimizer) -> None:
    """Flip ``requires_grad``; frozen tensors lose their gradient and their optimizer state."""
    for p in params:
        p.requires_grad_(on)
        if not on:
            p.grad = None
            optimizer.state.pop(p, None)


@dataclass
class LisaParams:
    lisa_activated_layers: int = 2  # γ: layers unfrozen per period
    lisa_interval_steps: int = 20  # K: steps per period

    def __post_init__(self) -> None:
        check_positive("method.lisa_activated_layers", self.lisa_activated_layers)
        check_positive("method.lisa_interval_steps", self.lisa_interval_steps)


@PROCEDURES.register("lisa")
class Lisa(Procedure):
    Params = LisaParams
    size_knob = "lisa_activated_layers"  # what a size budget sets (lorabench/budget.py)
    paper = "Pan et al., 2024, arXiv:2403.17919"
    backed_by = "lorabench"
    requires_adapter = ("none",)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: LisaParams, ctx: MethodContext) -> None:
        self.layers, self.always = layer_parameters(model)
        if params.lisa_activated_layers > len(self.layers):
            raise ConfigError(
                f"method.lisa_activated_layers={params.lisa_activated_layers} exceeds the model's "
                f"{len(self.layers)} layers"
            )
        self.optimizer, self.params, self.max_steps = optimizer, params, ctx.max_steps
        self.rng = random.Random(ctx.seed)
        self.periods: list[dict] = []
        set_trainable(self.always, True, optimizer)
        self._switch(0)

    def _switch(self, step: int) -> None:
        active = sorted(self.rng.sample(range(len(self.layers)), self.params.lisa_activated_layers))
        for i, params in enumerate(self.layers):
            set_trainable(params, i in active, self.optimizer)
        self.active = active
        self.periods.append({"start_step": step, "layers": active})

    def on_step_end(self, step: int) -> None:
        if step % self.params.lisa_interval_steps == 0 and step < self.max_steps:  # no switch after the last step
            self._switch(step)

    def expected_trainable(self, base_model: nn.Module, params: LisaParams, ctx: MethodContext) -> int:
        """Trainable parameters at any step when layers are equally sized: non-layer + γ layers."""
        layers, always = layer_parameters(base_model)
        sizes = sorted(sum(p.numel() for p in ps) for ps in layers)
        return sum(p.numel() for p in always) + sum(sizes[-params.lisa_activated_layers :])

    def state(self) -> dict:
        return {"lisa_num_layers": len(self.layers), "lisa_periods": self.periods}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "active": self.active, "periods": self.periods}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.active, self.periods = list(state["active"]), list(state["periods"])
        for i, params in enumerate(self.layers):
            set_trainable(params, i in self.active, self.optimizer)
