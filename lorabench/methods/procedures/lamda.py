"""LaMDA's progressive freezing of PMB (Azizi et al., 2024, arXiv:2406.12832), run from the loop.

PMB's r columns freeze one after another, evenly spread between step ``pmb_freeze_start`` x
max_steps and ``pmb_freeze_end`` x max_steps (fractions of ``train.max_steps``); column i is frozen
from step start + (i + 1) (end - start) / r on. A frozen column gets zero gradient
(``after_backward``) and is restored to its value at freezing time after every optimizer step
(``on_step_end``), so Adam's momentum and weight decay cannot move it. The exact schedule of the
paper (which columns, how fast) is not recorded in METHODS.md; this linear column-by-column schedule
is our reading of "gradually freezes PMB during the early fine-tuning stages". ``state()`` reports
how many PMB columns are frozen; ``state_dict()`` (checkpoints) holds that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.adapters.lamda import LamdaLayer
from lorabench.methods.base import MethodContext, Procedure
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
    requires_adapter = ("lamda",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: LamdaFreezeParams, ctx: MethodContext
    ) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, LamdaLayer)]
        if not self.layers:
            raise ValueError("the lamda procedure found no LaMDA layers")
        r = self.layers[0].lora_B.shape[1]
        start, end = params.pmb_freeze_start * ctx.max_steps, params.pmb_freeze_end * ctx.max_steps
        self.freeze_at = [math.ceil(start + (i + 1) * (end - start) / r) for i in range(r)]
        self.frozen = 0
        self.values: list[torch.Tensor] = [m.lora_B.detach().clone() for m in self.layers]

    def _update_frozen(self, step: int) -> None:
        now = sum(1 for t in self.freeze_at if t <= step)
        if now > self.frozen:
            for layer, saved in zip(self.layers, self.values):
                saved[:, self.frozen : now] = layer.lora_B.detach()[:, self.frozen : now]
            self.frozen = now

    def after_backward(self, step: int) -> None:
        self._update_frozen(step)
        if self.frozen:
            for layer in self.layers:
                if layer.lora_B.grad is not None:
                    layer.lora_B.grad[:, : self.frozen].zero_()

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        if self.frozen:
            for layer, saved in zip(self.layers, self.values):
                layer.lora_B[:, : self.frozen] = saved[:, : self.frozen]
        self._update_frozen(step)

    def state(self) -> dict:
        return {"lamda_pmb_frozen_columns": self.frozen, "lamda_rank": len(self.freeze_at)}

    def state_dict(self) -> dict:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        """Frozen columns hold their frozen values in the checkpoint's PMB (loaded before this)."""
        self.frozen = int(state["frozen"])
        self.values = [m.lora_B.detach().clone() for m in self.layers]
