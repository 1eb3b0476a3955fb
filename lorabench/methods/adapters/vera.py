"""VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454), backed by peft.

Update rule: W = W0 + Lambda_b B Lambda_d A, where A (r x d_in) and B (d_out x r) are frozen random
matrices drawn once from a seed and shared by every adapted layer, Lambda_d = diag(d) (d in R^r,
init d_initial) and Lambda_b = diag(b) (b in R^d_out, init 0) train. Trainable parameters per target:
r + d_out (independent of d_in), plus the task head.
Hyper-parameters (peft ``VeraConfig`` defaults, the paper's): rank r = 256, d_initial = 0.1,
dropout 0.0, projection_prng_key 0 (the seed of A and B). The paper uses a larger learning rate than
LoRA (about 10x on GLUE).
"""

from __future__ import annotations

from torch import nn

from lorabench.method_params.adapters import VeraParams
from lorabench.methods.adapters.lora import TASK_TYPES
from lorabench.methods.base import Adapter, MethodContext, head_parameter_count, target_linear_weights
from lorabench.registry import ADAPTERS


@ADAPTERS.register("vera")
class VeraAdapter(Adapter):
    Params = VeraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Kopiczko et al., 2024, arXiv:2310.11454"
    backed_by = "peft"

    def apply(self, model: nn.Module, params: VeraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        from peft import VeraConfig, get_peft_model

        config = VeraConfig(
            task_type=TASK_TYPES[ctx.head],
            r=params.rank,
            d_initial=params.d_initial,
            vera_dropout=params.dropout,
            projection_prng_key=params.projection_seed,
            target_modules=ctx.target_modules,
            **init_kwargs,
        )
        return get_peft_model(model, config)

    def expected_trainable(self, base_model: nn.Module, params: VeraParams, ctx: MethodContext) -> int:
        """r + d_out per targeted linear layer (the d and b vectors), plus the task head."""
        vera = sum(params.rank + w.shape[0] for _, w in target_linear_weights(base_model, ctx.target_modules))
        return vera + head_parameter_count(base_model, ctx.head)
