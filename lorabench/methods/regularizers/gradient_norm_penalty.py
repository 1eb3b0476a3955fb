"""Gradient-norm penalty (Zhao, Zhang & Hu, "Penalizing Gradient Norm for Efficiently Improving
Generalization in Deep Learning", ICML 2022, arXiv:2202.03599), the family GLAD's regularizer belongs
to (Peng et al., 2025, arXiv:2507.13089, "Generalizable LoRA tuning with RegulArized GraDient").

The objective L(theta) + lambda ||g(theta)||, g = grad L, has the gradient g + lambda H g / ||g||,
and H g / ||g|| is taken by a finite difference along the normalised gradient:

    g_total = (1 - alpha) g(theta) + alpha g(theta + r g(theta) / ||g(theta)||),   alpha = lambda / r

(alpha = 1 is SAM's gradient). Per optimizer step this needs two forward-backward passes over the
same micro-batches (``passes = 2``): the first at theta, then theta moves by r g / ||g|| (the norm
over every trainable tensor), the second pass runs there, theta is restored exactly (from a copy),
and the gradients become the mix above before clipping and the optimizer step.

GLAD: its paper describes a gradient-based regularizer that uses the SAM gradient as a reference
signal to steer the original gradient, on LoRA-tuned CLIP; its exact formula could not be obtained
here and no code has been released ("will be publicly available"). This is therefore the
gradient-norm penalty family, named as such, not GLAD. Defaults: alpha 0.8 (the balance Zhao et al.
report working best; uncertain) and r 0.05 (SAM's usual rho): our choice, tune them per task.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.regularizers import GradientNormPenaltyParams
from lorabench.methods.base import MethodContext, Regularizer
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import REGULARIZERS


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@REGULARIZERS.register("gradient_norm_penalty")
class GradientNormPenalty(Regularizer):
    Params = GradientNormPenaltyParams
    paper = "arXiv:2202.03599"
    backed_by = "lorabench"
    passes = 2
    fidelity = Fidelity(
        reference="Zhao, Zhang & Hu 2022, Algorithm 1 (finite-difference gradient of L + lambda ||g||)",
        status="rule",
        deviations=("stands for GLAD, whose exact regularizer and code are not available",),
    )

    def setup(self, model: nn.Module, optimizer, params: GradientNormPenaltyParams, ctx: MethodContext) -> None:
        self.params = params
        self._first: list[torch.Tensor | None] = []
        self._saved: list[torch.Tensor] = []
        self.last_grad_norm: float | None = None

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int, pass_index: int = 0) -> None:
        params = trainable(model)
        if pass_index == 0:
            self._first = [None if p.grad is None else p.grad.detach().clone() for p in params]
            norm = torch.sqrt(sum(_at_least_fp32(g).pow(2).sum() for g in self._first if g is not None))
            self.last_grad_norm = float(norm)
            self._saved = [p.detach().clone() for p in params]
            if norm > 0:
                scale = self.params.gnp_radius / norm
                for p, g in zip(params, self._first):
                    if g is not None:
                        p.add_(g.to(p.dtype), alpha=float(scale))
            for p in params:
                p.grad = None
            return
        alpha = self.params.gnp_alpha
        for p, saved, first in zip(params, self._saved, self._first):
            p.copy_(saved)
            if first is None:
                continue
            second = p.grad if p.grad is not None else torch.zeros_like(first)
            p.grad = (1 - alpha) * first + alpha * second
        self._first, self._saved = [], []

    def state(self) -> dict:
        p = self.params
        return {"alpha": p.gnp_alpha, "radius": p.gnp_radius, "last_gradient_norm": self.last_grad_norm}
