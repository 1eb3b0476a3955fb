"""X-LoRA (Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts", arXiv:2402.07148),
backed by peft.

Composition of K already-trained LoRA experts: a small classifier reads the hidden states of a first
(scaling) pass and outputs per-token, per-layer mixing weights lambda; the second pass uses
W = W0 + sum_k lambda_k s B_k A_k. Only the classifier trains (``use_trainable_adapters: false``).
Hyper-parameters (peft ``XLoraConfig`` defaults): xlora_depth 1, xlora_size 2048, dropout 0.2,
softmax over experts (temperature 1), optional top-k experts, layer-wise scalings off.

``experts`` lists K trained LoRA runs of lorabench (their run folders, which hold ``peft_adapter/``)
or peft adapter folders, all trained on the same base model. peft's X-LoRA supports causal LMs
only; it disables the KV cache. The two-stage recipe (train K experts, then the classifier) is
``scripts/xlora.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import Adapter, MethodContext
from lorabench.registry import ADAPTERS

PEFT_ADAPTER_DIR = "peft_adapter"  # where the training loop saves peft adapters in a run folder


def expert_path(path: str) -> str:
    """A peft adapter folder: ``path`` itself or ``path/peft_adapter`` (a lorabench run folder)."""
    for candidate in (Path(path) / PEFT_ADAPTER_DIR, Path(path)):
        if (candidate / "adapter_config.json").is_file():
            return str(candidate)
    raise ConfigError(
        f"method.experts: {path!r} is neither a lorabench LoRA run folder (with {PEFT_ADAPTER_DIR}/) "
        "nor a peft adapter folder (with adapter_config.json)"
    )


@dataclass
class XLoraParams:
    experts: list[str] = field(default_factory=list)
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout: float = 0.2
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    layerwise_scalings: bool = False

    def __post_init__(self) -> None:
        if len(self.experts) < 2:
            raise ConfigError(
                f"method.experts={self.experts!r}: X-LoRA needs at least 2 trained LoRA experts "
                "(run folders of LoRA runs on the same base model); see scripts/xlora.py"
            )
        self.experts = [expert_path(p) for p in self.experts]


@ADAPTERS.register("xlora")
class XLoraAdapter(Adapter):
    Params = XLoraParams
    paper = "Buehler & Buehler, 2024, arXiv:2402.07148"
    backed_by = "peft"

    def apply(self, model: nn.Module, params: XLoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        from peft import XLoraConfig, get_peft_model

        if ctx.head != "causal_lm":
            raise ConfigError(
                "X-LoRA (method.adapter=xlora) supports causal language models only (peft); "
                "use a generation dataset such as gsm8k, e2e or metamathqa"
            )
        model.config.use_cache = False
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=model.config.hidden_size,
            adapters={str(i): path for i, path in enumerate(params.experts)},
            xlora_depth=params.xlora_depth,
            xlora_size=params.xlora_size,
            xlora_dropout_p=params.xlora_dropout,
            softmax_temperature=params.softmax_temperature,
            top_k_lora=params.top_k_lora,
            layerwise_scalings=params.layerwise_scalings,
        )
        return get_peft_model(model, config)
