"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), backed by peft.

Update rule: W = W0 + (alpha / r) * B A with B (d_out x r) = 0 and A (r x d_in) random at init;
only A and B (and a task head) train. Trainable parameters per target: r * (d_in + d_out).
Hyper-parameters: rank r (paper: 4-8 on GLUE), alpha (paper: alpha = r .. 2r), dropout.
Initializers (PiSSA, EVA, LoRA-GA, ...) reach peft through ``init_kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, TaskType, get_peft_model
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.base import Adapter, MethodContext, head_parameter_count, target_linear_weights
from lorabench.registry import ADAPTERS

TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}


@dataclass
class LoraParams:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            from lorabench.errors import ConfigError

            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")


@ADAPTERS.register("lora")
class LoraAdapter(Adapter):
    Params = LoraParams
    paper = "Hu et al., 2021, arXiv:2106.09685"
    backed_by = "peft"

    def apply(self, model: nn.Module, params: LoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        config = LoraConfig(
            task_type=TASK_TYPES[ctx.head], r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
            target_modules=ctx.target_modules, **init_kwargs,
        )
        return get_peft_model(model, config)

    def expected_trainable(self, base_model: nn.Module, params: LoraParams, ctx: MethodContext) -> int:
        """r * (d_in + d_out) per targeted linear layer, plus the task head (trained in full)."""
        lora = sum(params.rank * (w.shape[0] + w.shape[1]) for _, w in target_linear_weights(base_model, ctx.target_modules))
        return lora + head_parameter_count(base_model, ctx.head)
