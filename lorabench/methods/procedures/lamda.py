"""LaMDA's gradual freezing of PMB (Azizi et al., 2024, arXiv:2406.12832), run from the loop.

The rule of the authors' trainer (ArminAzizi98/LaMDA@8ad34b46e154 ``custom_trainer.py``,
``gradual_freeze_B``, called after every backward with their cumulative micro-batch counter): after
the backward of optimizer step g (g = 1, 2, ..., T = ``train.max_steps``)

    t = floor(g / (eta T)),   eta = ``pmb_freeze_every`` (theirs: 0.3)

and in a layer of rank r:

* t < r: the gradient of PMB's first t columns is set to 0. Nothing else holds them: AdamW's moments
  and weight decay still move those columns, as in the reference;
* t >= r: PMB stops training. At the step where t first reaches r its gradient is kept whole (the
  reference turns ``requires_grad`` off after that backward and steps with the gradient it has); from
  the next step on PMB has no gradient, so AdamW skips it (no moment, no weight decay). Here the
  gradient is dropped (set to None) rather than ``requires_grad`` turned off, so PMB stays in the
  adapter file and in checkpoints.

With eta = 0.3, t reaches 1, 2, 3 at 30%, 60%, 90% of the run: at most 3 columns of a rank-r PMB
stop receiving gradient, and only layers of rank <= 3 (LaMDA++'s per-layer ranks,
adapters/lamda.py) freeze entirely. t is computed as the reference does it in floating point
(g / (eta T)), so e.g. T = 10 reaches t = 1 at g = 4, not 3. The rule depends on the step only:
``state_dict()`` (checkpoints) holds the last t for the report, and a resumed run needs nothing
else. ``state()`` reports t (the PMB columns without gradient in the widest layer), its rank, and per
layer the columns without gradient and whether PMB has stopped training.

Deviation kept: with gradient accumulation the reference recomputes t after every micro-batch from
its micro-batch counter; here t comes from the optimizer step (the same value at the last
micro-batch, up to floating-point rounding at a boundary, except that a layer freezing in the middle
of an accumulated step keeps only the reference's earlier micro-batches' gradient there).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.procedures import LamdaFreezeParams
from lorabench.methods.adapters.lamda import REPO, LamdaLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import PROCEDURES


@PROCEDURES.register("lamda")
class LamdaFreeze(Procedure):
    Params = LamdaFreezeParams
    paper = "Azizi et al., 2024, arXiv:2406.12832"
    fidelity = Fidelity(
        reference=f"{REPO} custom_trainer.py (gradual_freeze_B, eta=0.3)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 AdamW steps (fp32, CPU); the freezing schedule exactly",
        fixture="tests/fixtures/parity/lamda.json",
        deviations=(
            "a layer whose PMB stops training keeps requires_grad and has its gradient dropped instead (same"
            " update: AdamW skips it), so PMB stays in the adapter file",
            "gradient accumulation: t comes from the optimizer step, the reference's from its micro-batch counter",
        ),
        revision=2,
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
        self.every, self.max_steps = params.pmb_freeze_every, max(ctx.max_steps, 1)
        self.widest = max(range(len(self.ranks)), key=lambda i: self.ranks[i])
        self.t = 0

    def frozen_columns(self, step: int) -> int:
        """t after the backward of 0-based step ``step`` (optimizer step g = step + 1)."""
        return int((step + 1) / (self.every * self.max_steps))

    def after_backward(self, step: int) -> None:
        self.t = t = self.frozen_columns(step)
        before = self.frozen_columns(step - 1) if step > 0 else 0
        for layer, r in zip(self.layers, self.ranks):
            grad = layer.lora_B.grad
            if t >= r:
                if before >= r:  # stopped training at an earlier step: no gradient, AdamW skips it
                    layer.lora_B.grad = None
            elif t and grad is not None:
                grad[:, :t] = 0

    def state(self) -> dict:
        out = {"lamda_pmb_frozen_columns": min(self.t, self.ranks[self.widest]), "lamda_rank": self.ranks[self.widest]}
        if len(set(self.ranks)) > 1:
            out["lamda_pmb_frozen_columns_per_layer"] = {n: min(self.t, r) for n, r in zip(self.names, self.ranks)}
        stopped = [n for n, r in zip(self.names, self.ranks) if self.t >= r]
        if stopped:
            out["lamda_pmb_stopped"] = stopped
        return out

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        """Only the report needs the last t: the rule depends on the step alone."""
        self.t = int(state.get("t", 0))
