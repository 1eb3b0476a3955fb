"""LISA (Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
Model Fine-Tuning", arXiv:2403.17919), with adapter none and AdamW.

Every K steps (at steps 0, K, 2K, ...): freeze all transformer layers, then unfreeze γ layers sampled
uniformly without replacement; everything outside the layer list (embeddings, final norm, pooler,
LM/task head) always trains. With period p = ⌊t / K⌋: trainable(t) = non-layer params ∪ {layer l :
l ∈ S_p}, S_p ~ Uniform(γ-subsets of {0..L-1}). Full-parameter AdamW over every parameter; a frozen
layer gets no gradient, so AdamW leaves it and its state alone: the moments and step count of a
layer that is re-frozen are kept and resume when it is sampled again (as the authors' LMFlow
callback leaves them), so optimizer memory grows to the layers visited so far.
Sampling: ``numpy.random.RandomState(seed).choice(L, γ, replace=False)``, the call LMFlow makes on
numpy's global generator (seeded with the run's seed by the HF Trainer), so a seed gives LMFlow's
layer schedule.
Hyper-parameters: γ = ``lisa_activated_layers`` (LMFlow's default 2; its example script 1) and K =
``lisa_interval_steps`` (LMFlow: 20); full-FT-like lr (~1e-5).
The layer list is found generically (``transformer_layers``): the ``nn.ModuleList`` holding the most
parameters (``bert.encoder.layer``, ``model.layers``, ``transformer.h``, ...), the lists LMFlow names
per model class.
Multi-process runs: changing ``requires_grad`` under DDP needs ``find_unused_parameters``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.procedures import LisaParams
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
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


def set_trainable(params: list[nn.Parameter], on: bool) -> None:
    """Flip ``requires_grad``; frozen tensors lose their gradient (their optimizer state is the caller's)."""
    for p in params:
        p.requires_grad_(on)
        if not on:
            p.grad = None


@PROCEDURES.register("lisa")
class Lisa(Procedure):
    Params = LisaParams
    size_knob = "lisa_activated_layers"  # what a size budget sets (lorabench/budget.py)
    paper = "Pan et al., 2024, arXiv:2403.17919"
    backed_by = "lorabench"
    requires_adapter = ("none",)
    moves_trainable_set = True  # layers trained earlier are frozen later: checkpoints keep every weight
    fidelity = Fidelity(
        reference="OptimalScale/LMFlow@f3597dba134e src/lmflow/pipeline/utils/lisa_trainer.py"
        " (DynamicLayerActivationCallback)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 20-100 steps (fp32, CPU); sampled layers and Adam-state sizes equal at"
        " every step",
        fixture="tests/fixtures/parity/lisa.json",
        unchecked=(
            "the HF Trainer around the callback: the parity calls its on_step_begin before each step of a torch"
            " AdamW built over every parameter, as the Trainer builds it before the first switch",
            "the schedule equals LMFlow's only while nothing else draws from numpy's global generator between the"
            " Trainer's set_seed and the first step (lorabench draws from a generator of its own)",
            "resume: LMFlow does not restore the active layers from a checkpoint (every layer trains until the"
            " next switch); lorabench restores them",
        ),
        revision=2,  # numpy sampling and kept optimizer state of re-frozen layers
    )

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: LisaParams, ctx: MethodContext) -> None:
        self.layers, self.always = layer_parameters(model)
        if params.lisa_activated_layers > len(self.layers):
            raise ConfigError(
                f"method.lisa_activated_layers={params.lisa_activated_layers} exceeds the model's "
                f"{len(self.layers)} layers"
            )
        self.optimizer, self.params, self.max_steps, self.seed = optimizer, params, ctx.max_steps, ctx.seed
        self.rng = np.random.RandomState(ctx.seed)
        self.draws = 0
        self.periods: list[dict] = []
        set_trainable(self.always, True)
        self._switch(0)

    def _sample(self) -> list[int]:
        self.draws += 1
        chosen = self.rng.choice(len(self.layers), self.params.lisa_activated_layers, replace=False)
        return sorted(int(i) for i in chosen)

    def _switch(self, step: int) -> None:
        active = self._sample()
        for i, params in enumerate(self.layers):
            set_trainable(params, i in active)
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
        return {"draws": self.draws, "active": self.active, "periods": self.periods}

    def load_state_dict(self, state: dict) -> None:
        self.rng, self.draws = np.random.RandomState(self.seed), 0
        for _ in range(state["draws"]):  # replay the draws made so far
            self._sample()
        self.active, self.periods = list(state["active"]), list(state["periods"])
        for i, params in enumerate(self.layers):
            set_trainable(params, i in self.active)
