"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), backed by peft.

Update rule: W = W0 + (alpha / r) * B A with B (d_out x r) = 0 and A (r x d_in) random at init;
only A and B (and a task head) train. Trainable parameters per target: r * (d_in + d_out).
Hyper-parameters: rank r (paper: 4-8 on GLUE), alpha (paper: alpha = r .. 2r), dropout.
Initializers (PiSSA, EVA, LoRA-GA, ...) reach peft through ``init_kwargs``.

Three published variants are flags of the same peft ``LoraConfig`` path (so every LoRA initializer
and LoRA optimizer combines with them):
* ``use_dora`` - DoRA (Liu et al., 2024, arXiv:2402.09353): W = m * (W0 + s B A) / ||W0 + s B A||_c
  with a trainable magnitude vector m (d_out, init ||W0||_c); + d_out trainable per target.
* ``use_rslora`` - rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): scale s = alpha / sqrt(r)
  instead of alpha / r, so that high ranks keep learning; same trainable count.
* ``freeze_a`` - FFA-LoRA (Sun et al., 2024, arXiv:2403.12313): A keeps its random init and is
  frozen, only the zero-init B trains; trainable per target: r * d_out. LoRA-FA uses it too.
"""

from __future__ import annotations

from torch import nn

from lorabench.method_params.adapters import LoraParams
from lorabench.methods.base import Adapter, MethodContext, head_parameter_count, target_linear_weights
from lorabench.registry import ADAPTERS

TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}  # peft TaskType values


@ADAPTERS.register("lora")
class LoraAdapter(Adapter):
    Params = LoraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Hu et al., 2021, arXiv:2106.09685"
    backed_by = "peft"

    def apply(self, model: nn.Module, params: LoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type=TASK_TYPES[ctx.head],
            r=params.rank,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=ctx.target_modules,
            use_dora=params.use_dora,
            use_rslora=params.use_rslora,
            **init_kwargs,
        )
        model = get_peft_model(model, config)
        if params.freeze_a:
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        return model

    def expected_trainable(self, base_model: nn.Module, params: LoraParams, ctx: MethodContext) -> int:
        """r * (d_in + d_out) per targeted linear layer (r * d_out with ``freeze_a``; + d_out for the
        DoRA magnitude), plus the task head (trained in full)."""
        total = 0
        for _, w in target_linear_weights(base_model, ctx.target_modules):
            d_out, d_in = w.shape
            total += (
                params.rank * d_out + (0 if params.freeze_a else params.rank * d_in) + (d_out if params.use_dora else 0)
            )
        return total + head_parameter_count(base_model, ctx.head)
