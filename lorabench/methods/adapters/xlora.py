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

from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters import PEFT_ADAPTER_DIR, XLoraParams  # noqa: F401  (PEFT_ADAPTER_DIR re-exported)
from lorabench.methods.base import Adapter, MethodContext
from lorabench.registry import ADAPTERS


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
