"""SoMA's annealed weight decay (Yun et al., 2025, "SoMA: Singular Value Decomposed Minor Components
Adaptation for Domain Generalizable Representation Learning", arXiv:2412.04077), run from the loop.

Authors' rule (ysj9909/SoMA, ``configs/sora/sora_dinov2-L_mask2former.py`` and the other
``configs/sora/*.py`` / ``DGOD/configs/sora/*.py``): AdamW with ``weight_decay=0.05`` and an mmengine
``CosineAnnealingParamScheduler`` on ``weight_decay`` with ``eta_min=1e-5``, ``begin=0``,
``end=max_iters``, stepped per iteration; the weight decay is AdamW's plain decoupled decay towards
zero (W -= lr wd W), not towards the initial minor components. It acts on the LoRA factors
(``backbone`` ``decay_mult=1.0``) and the head, not on norms (``norm_decay_mult=0.0``, optimizer
constructor ``rein/optimizers/peft_optimizer_constructor.py``); ``rein/optimizers/
weight_decay_logging_hook.py`` logs it. Here, for optimizer step t = 0..T-1 (T = ``train.max_steps``):

    wd(t) = wd_end + (wd_start - wd_end) (1 + cos(pi t / T)) / 2,   wd_start = 0.05, wd_end = 1e-5,

set on every optimizer parameter group whose tensors are all >= 2-D (the decay group of
``decay_groups``: SoMA's B and A and the task head's weight; this replaces ``train.weight_decay``
there). Groups of 1-D tensors (biases, norms) keep their weight decay (0 with AdamW). In lorabench
B and A train and the residual W0 - s B0 A0 is frozen, as in the authors' layer, so decaying B and A
towards zero is the authors' decay. Not replicated: mmengine anneals zero-decay groups from 0 up to
eta_min = 1e-5 too; we leave them at 0. ``setup`` sets wd(0); ``on_step_end(n)`` (n steps done)
sets wd(n) for the next step. ``state()`` reports the schedule, the wd used by the last step taken,
and the transformer blocks with no trainable parameter (the SoMA adapter's frozen blocks,
``freeze_first_blocks``); ``state_dict()`` holds the step count, from which the schedule resumes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.procedures import SomaWdParams
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.procedures.lisa import transformer_layers
from lorabench.registry import PROCEDURES


def cosine_weight_decay(t: int, total: int, start: float, end: float) -> float:
    """wd(t) = end + (start - end) (1 + cos(pi min(t, T) / T)) / 2."""
    t = min(max(t, 0), total)
    return end + (start - end) * (1 + math.cos(math.pi * t / total)) / 2


@PROCEDURES.register("soma_wd")
class SomaWeightDecay(Procedure):
    Params = SomaWdParams
    paper = "Yun et al., 2025, arXiv:2412.04077"
    fidelity = Fidelity(
        reference="ysj9909/SoMA configs/sora/*.py (the schedule read from the authors' configs, not run)",
        status="unchecked",
        unchecked=("no parity fixture produced by the authors' code yet",),
    )
    backed_by = "lorabench"

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: SomaWdParams, ctx: MethodContext
    ) -> None:
        self.optimizer, self.params, self.total = optimizer, params, max(ctx.max_steps, 1)
        # indices, not dicts: optimizer.load_state_dict (resume) replaces the group dicts
        self.group_ids = [
            i for i, g in enumerate(optimizer.param_groups) if g["params"] and all(p.ndim >= 2 for p in g["params"])
        ]
        if not self.group_ids:
            raise ValueError("the soma_wd procedure found no optimizer group of >= 2-D tensors to decay")
        try:
            _, blocks = transformer_layers(model)
            self.num_blocks = len(blocks)
            self.frozen_blocks = [
                i for i, block in enumerate(blocks) if not any(p.requires_grad for p in block.parameters())
            ]
        except ConfigError:
            self.num_blocks, self.frozen_blocks = 0, []
        self.step = 0
        self._apply()

    def value(self, t: int) -> float:
        return cosine_weight_decay(t, self.total, self.params.soma_wd_start, self.params.soma_wd_end)

    def _apply(self) -> None:
        wd = self.value(self.step)
        for i in self.group_ids:
            self.optimizer.param_groups[i]["weight_decay"] = wd

    def on_step_end(self, step: int) -> None:
        self.step = step
        self._apply()

    def state(self) -> dict:
        return {
            "soma_wd_schedule": "cosine",
            "soma_wd_start": self.params.soma_wd_start,
            "soma_wd_end": self.params.soma_wd_end,
            "soma_wd_steps": self.step,
            "soma_wd_last": self.value(self.step - 1) if self.step > 0 else None,  # used by the last step taken
            "soma_wd_next": self.value(self.step),
            "soma_num_blocks": self.num_blocks,
            "soma_frozen_blocks": self.frozen_blocks,
        }

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self._apply()
