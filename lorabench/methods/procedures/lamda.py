"""LaMDA's progressive freezing of PMB (Azizi et al., 2024, arXiv:2406.12832), run from the loop.

Each layer's PMB columns freeze one after another, evenly spread between step ``pmb_freeze_start`` x
max_steps and ``pmb_freeze_end`` x max_steps (fractions of ``train.max_steps``); in a layer of rank
r_l, column i is frozen from step ceil(start + (i + 1) (end - start) / r_l) on, so every layer's PMB is
fully frozen at ``pmb_freeze_end`` whatever its rank (LaMDA++'s per-layer ranks, adapters/lamda.py).
A frozen column gets zero gradient (``after_backward``) and is restored to its value at freezing time
after every optimizer step (``on_step_end``), so Adam's momentum and weight decay cannot move it.
The paper's exact schedule is not recorded in METHODS.md; this linear column-by-column schedule is
our reading of "gradually freezes PMB during the early fine-tuning stages". (The authors' released
trainer, ``custom_trainer.py`` ``gradual_freeze_B`` in github.com/ArminAzizi98/LaMDA, zeroes the
gradient of the first t = floor(iteration / (0.3 max_steps grad_accum)) columns and turns off
``requires_grad`` once t >= r; not reproduced here.) ``state()`` reports how many PMB columns are
frozen (and the rank) of the largest-rank layer, which with uniform ranks is every layer; with mixed
ranks it adds the count per layer. ``state_dict()`` (checkpoints) holds the count (one int with
uniform ranks, one per layer otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.adapters.lamda import LamdaLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import PROCEDURES


@dataclass
class LamdaFreezeParams:
    pmb_freeze_start: float = 0.0
    pmb_freeze_end: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.pmb_freeze_start <= self.pmb_freeze_end <= 1:
            raise ConfigError(
                f"method.pmb_freeze_start={self.pmb_freeze_start!r} and method.pmb_freeze_end="
                f"{self.pmb_freeze_end!r} must satisfy 0 <= start <= end <= 1 (fractions of train.max_steps)"
            )


@PROCEDURES.register("lamda")
class LamdaFreeze(Procedure):
    Params = LamdaFreezeParams
    paper = "Azizi et al., 2024, arXiv:2406.12832"
    fidelity = Fidelity(
        reference="ArminAzizi98/LaMDA",
        status="unchecked",
        unchecked=(
            "no parity fixture produced by the authors' code yet",
            "the authors freeze at most 3 PMB columns over a run; ours freezes all of PMB by 10% of training",
        ),
    )
    requires_adapter = ("lamda",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: LamdaFreezeParams, ctx: MethodContext
    ) -> None:
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LamdaLayer)]
        if not named:
            raise ValueError("the lamda procedure found no LaMDA layers")
        self.names = [n for n, _ in named]
        self.layers = [m for _, m in named]
        self.ranks = [m.lora_B.shape[1] for m in self.layers]
        start, end = params.pmb_freeze_start * ctx.max_steps, params.pmb_freeze_end * ctx.max_steps

        def schedule(r: int) -> list[int]:
            return [math.ceil(start + (i + 1) * (end - start) / r) for i in range(r)]

        self.schedules = [schedule(r) for r in self.ranks]
        self.widest = max(range(len(self.ranks)), key=lambda i: self.ranks[i])
        self.freeze_at = self.schedules[self.widest]  # with uniform ranks, every layer's schedule
        self.frozen = [0] * len(self.layers)
        self.values: list[torch.Tensor] = [m.lora_B.detach().clone() for m in self.layers]

    @property
    def uniform(self) -> bool:
        return len(set(self.ranks)) == 1

    def _update_frozen(self, step: int) -> None:
        for k, (layer, saved, sched) in enumerate(zip(self.layers, self.values, self.schedules)):
            now = sum(1 for t in sched if t <= step)
            if now > self.frozen[k]:
                saved[:, self.frozen[k] : now] = layer.lora_B.detach()[:, self.frozen[k] : now]
                self.frozen[k] = now

    def after_backward(self, step: int) -> None:
        self._update_frozen(step)
        for layer, n in zip(self.layers, self.frozen):
            if n and layer.lora_B.grad is not None:
                layer.lora_B.grad[:, :n].zero_()

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        for layer, saved, n in zip(self.layers, self.values, self.frozen):
            if n:
                layer.lora_B[:, :n] = saved[:, :n]
        self._update_frozen(step)

    def state(self) -> dict:
        out = {"lamda_pmb_frozen_columns": self.frozen[self.widest], "lamda_rank": self.ranks[self.widest]}
        if not self.uniform:
            out["lamda_pmb_frozen_columns_per_layer"] = dict(zip(self.names, self.frozen))
        return out

    def state_dict(self) -> dict:
        return {"frozen": self.frozen[0] if self.uniform else list(self.frozen)}

    def load_state_dict(self, state: dict) -> None:
        """Frozen columns hold their frozen values in the checkpoint's PMB (loaded before this)."""
        frozen = state["frozen"]
        frozen = [int(frozen)] * len(self.layers) if isinstance(frozen, int) else [int(n) for n in frozen]
        if len(frozen) != len(self.layers):
            raise ValueError(f"lamda checkpoint state has {len(frozen)} layers, the model {len(self.layers)}")
        self.frozen = frozen
        self.values = [m.lora_B.detach().clone() for m in self.layers]
