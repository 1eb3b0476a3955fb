"""RandLoRA (Albert et al., 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large
models", arXiv:2502.00987), backed by peft.

Update rule: W = W0 + s * sum_{k=1..n} B_k Lambda_k A Gamma_k with n = ceil(min(d_in, d_out) / r)
bases; B_k (max(d) x r) and A (r x min(d)) are frozen random matrices (seeded, shared across layers,
sliced per shape); only the diagonals Lambda_k (r each, init N(0, 1)) and Gamma_k (min(d) each,
init 1 / max(d)) train, so the update is full-rank. Trainable parameters per target:
n * (r + min(d_in, d_out)), plus the task head. A *smaller* r gives *more* bases and parameters.
Hyper-parameters (peft ``RandLoraConfig`` defaults): basis rank r = 32, randlora_alpha = 640
(s = alpha / r = 20), dropout 0.0, sparse / very_sparse bases off, projection_prng_key 0.
"""

from __future__ import annotations

import math

from torch import nn

from lorabench.method_params.adapters import RandLoraParams
from lorabench.methods.adapters.lora import TASK_TYPES
from lorabench.methods.base import Adapter, MethodContext, head_parameter_count, target_linear_weights
from lorabench.registry import ADAPTERS


@ADAPTERS.register("randlora")
class RandLoraAdapter(Adapter):
    Params = RandLoraParams
    paper = "Albert et al., 2025, arXiv:2502.00987"
    backed_by = "peft"

    def apply(self, model: nn.Module, params: RandLoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        from peft import RandLoraConfig, get_peft_model

        config = RandLoraConfig(
            task_type=TASK_TYPES[ctx.head],
            r=params.rank,
            randlora_alpha=params.alpha,
            randlora_dropout=params.dropout,
            sparse=params.sparse,
            very_sparse=params.very_sparse,
            projection_prng_key=params.projection_seed,
            target_modules=ctx.target_modules,
            **init_kwargs,
        )
        return get_peft_model(model, config)

    def expected_trainable(self, base_model: nn.Module, params: RandLoraParams, ctx: MethodContext) -> int:
        """n * (r + min(d)) per targeted linear layer with n = ceil(min(d) / r), plus the task head."""
        total = 0
        for _, w in target_linear_weights(base_model, ctx.target_modules):
            d_min = min(w.shape)
            n = math.ceil(d_min / params.rank)
            total += n * (params.rank + d_min)
        return total + head_parameter_count(base_model, ctx.head)
