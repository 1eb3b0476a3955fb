"""LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv:2308.03303), backed by peft's ``create_lorafa_optimizer``.

A stays frozen at its random init and only B trains (so the activations feeding A need not be
stored); peft's optimizer (the projected-gradient form of LoRA-FA, contributed as
huggingface/peft#2468) additionally projects B's gradient so that the update of B A best matches
the full-gradient step: g_B <- (1 / s^2) g_B (A A^T + 1e-8 I)^+, then Adam on B (betas 0.9, 0.999,
eps 1e-6, bias correction) and the weight decay after the update, B <- B - lr·wd·B (transformers'
old AdamW order). Other trainable tensors (the task head, biases included) get the same AdamW.
peft computes the projection under bf16 autocast wherever bf16 is available, CPU included.
Use it with ``method.freeze_a: true`` on the LoRA adapter (the preset does), so the trainable count
the adapter reports is what trains; ``build`` refuses a LoRA model whose A still requires grad.
Hyper-parameters: none of its own; lr and weight decay come from train.
"""

from __future__ import annotations

from importlib.metadata import version

import torch

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext, OptimizerBuilder
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import OPTIMIZERS


@OPTIMIZERS.register("lorafa")
class LoraFA(OptimizerBuilder):
    paper = "Zhang et al., 2023, arXiv:2308.03303"
    backed_by = "peft"
    fidelity = Fidelity(
        reference=f"peft=={version('peft')} peft.optimizers.create_lorafa_optimizer / LoraFAOptimizer"
        " (huggingface/peft#2468)",
        status="library",
        unchecked=(
            "no code of the original 2023 LoRA-FA (A frozen, plain AdamW on B) was compared; peft's optimizer is the"
            " projected-gradient form",
        ),
    )
    requires_adapter = ("lora",)

    def build(self, model, params, ctx: MethodContext) -> torch.optim.Optimizer:
        from peft.optimizers import create_lorafa_optimizer

        if any(".lora_A." in n and p.requires_grad for n, p in model.named_parameters()):
            raise ConfigError("optimizer lorafa freezes LoRA's A; set method.freeze_a=true so the adapter agrees")
        if any(".lora_magnitude_vector." in n for n, _ in model.named_parameters()):
            raise ConfigError(
                "optimizer lorafa pairs lora_A/lora_B tensors and does not support DoRA (method.use_dora)"
            )
        config = model.peft_config["default"]
        return create_lorafa_optimizer(
            model, r=config.r, lora_alpha=config.lora_alpha, lr=ctx.lr, weight_decay=ctx.weight_decay
        )
