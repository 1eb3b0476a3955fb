"""LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354), backed by peft's ``create_loraplus_optimizer``.

Update: AdamW with two learning rates, lr for A and lr * ratio for B (and, in peft's grouping, for
the 1-D trainable tensors: biases, norms, DoRA magnitudes), because with B = 0 at init the
efficient feature-learning rate of B is larger by a factor ~ width. Weight decay train.weight_decay
on every group except 1-D tensors.
Hyper-parameters: loraplus_lr_ratio = 16 (the paper's recommended 2^4 for LLMs), AdamW's
beta1 0.9, beta2 0.999, eps 1e-8.
"""

from __future__ import annotations

from importlib.metadata import version

import torch

from lorabench.method_params.optimizers import LoraPlusParams
from lorabench.methods.base import MethodContext, OptimizerBuilder
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import OPTIMIZERS


@OPTIMIZERS.register("loraplus")
class LoraPlus(OptimizerBuilder):
    Params = LoraPlusParams
    paper = "Hayou et al., 2024, arXiv:2402.12354"
    backed_by = "peft"
    fidelity = Fidelity(
        reference=f"peft=={version('peft')} peft.optimizers.create_loraplus_optimizer (a port of"
        " nikhil-ghosh-berkeley/loraplus@a0c44bfec0ef lora_plus.py: the same four groups)",
        status="library",
        deviations=(
            "the authors' function has no default ratio; 16 is the paper's recommendation for LLMs (their RoBERTa"
            " GLUE script uses 80 with lr 5e-5, alpha 8, beta2 0.99)",
        ),
    )
    requires_adapter = ("lora",)

    def build(self, model, params: LoraPlusParams, ctx: MethodContext) -> torch.optim.Optimizer:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=ctx.lr,
            loraplus_lr_ratio=params.loraplus_lr_ratio,
            loraplus_weight_decay=ctx.weight_decay,
            betas=(params.beta1, params.beta2),
            eps=params.eps,
        )
