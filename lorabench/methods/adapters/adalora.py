"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512), backed by peft. Pair it with the ``adalora`` procedure, which runs the allocator.

Update rule: W = W0 + (alpha / r_l) P Lambda Q, an SVD-shaped update with P (d_out x r), Lambda =
diag(E) (r) and Q (r x d_in), all trainable, plus an orthogonality penalty
orth_reg_weight * (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2) added to the loss by peft. Every deltaT
steps the allocator scores each triplet by the EMA-smoothed sensitivity |w * grad| (beta1) times its
uncertainty (beta2) and zeroes the lowest-scoring entries of E, lowering the total rank budget
from init_r per layer to target_r per layer on a cubic schedule between tinit and
total_step - tfinal (total_step = train.max_steps); the ranks are then fixed for the last tfinal steps.
Ranks are masked, not removed, so the trainable count stays init_r * (d_in + d_out + 1) per target.
Hyper-parameters (peft ``AdaLoraConfig`` defaults; the paper tunes tinit/tfinal/deltaT per GLUE
task, e.g. budget 144..576 total ranks on DeBERTaV3-base): init_r 12, target_r 8, alpha 8,
tinit 0, tfinal 0, deltaT 1, ipt_beta1 = ipt_beta2 = 0.85, orth_reg_weight 0.5.
"""

from __future__ import annotations

from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters import AdaLoraParams
from lorabench.methods.adapters.lora import TASK_TYPES
from lorabench.methods.base import Adapter, MethodContext, head_parameter_count, target_linear_weights
from lorabench.registry import ADAPTERS


@ADAPTERS.register("adalora")
class AdaLoraAdapter(Adapter):
    Params = AdaLoraParams
    paper = "Zhang et al., 2023, arXiv:2303.10512"
    backed_by = "peft"

    def apply(self, model: nn.Module, params: AdaLoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        from peft import AdaLoraConfig, get_peft_model

        if params.tinit >= ctx.max_steps - params.tfinal:
            raise ConfigError(
                f"AdaLoRA: method.tinit={params.tinit} + method.tfinal={params.tfinal} leave no budgeting "
                f"phase in train.max_steps={ctx.max_steps}; lower them or train longer"
            )
        config = AdaLoraConfig(
            task_type=TASK_TYPES[ctx.head],
            init_r=params.init_r,
            target_r=params.target_r,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            tinit=params.tinit,
            tfinal=params.tfinal,
            deltaT=params.delta_t,
            beta1=params.ipt_beta1,
            beta2=params.ipt_beta2,
            orth_reg_weight=params.orth_reg_weight,
            total_step=ctx.max_steps,
            target_modules=ctx.target_modules,
            **init_kwargs,
        )
        return get_peft_model(model, config)

    def expected_trainable(self, base_model: nn.Module, params: AdaLoraParams, ctx: MethodContext) -> int:
        """init_r * (d_in + d_out + 1) per targeted linear layer (P, Q and E), plus the task head."""
        total = sum(
            params.init_r * (w.shape[0] + w.shape[1] + 1)
            for _, w in target_linear_weights(base_model, ctx.target_modules)
        )
        return total + head_parameter_count(base_model, ctx.head)
