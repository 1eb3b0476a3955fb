"""AdamW (Loshchilov & Hutter, 2019) over every trainable parameter: the full fine-tuning baseline
and the optimizer of adapter methods. Update: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
W -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * W). No weight decay on 1-D tensors (biases, norms)."""

from __future__ import annotations

import torch

from lorabench.method_params.optimizers import AdamWParams
from lorabench.methods.base import MethodContext, OptimizerBuilder, decay_groups
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import OPTIMIZERS


@OPTIMIZERS.register("adamw")
class AdamW(OptimizerBuilder):
    Params = AdamWParams
    paper = "Loshchilov & Hutter, 2019, arXiv:1711.05101"
    backed_by = "torch"
    fidelity = Fidelity(reference=f"torch=={torch.__version__.split('+')[0]} (torch.optim.AdamW)", status="library")

    def build(self, model, params: AdamWParams, ctx: MethodContext) -> torch.optim.Optimizer:
        groups = decay_groups(model, ctx.weight_decay)
        return torch.optim.AdamW(groups, lr=ctx.lr, betas=(params.beta1, params.beta2), eps=params.eps)
