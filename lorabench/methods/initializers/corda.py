"""CorDA (Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models for Task-Aware Parameter-Efficient Fine-tuning", arXiv:2406.05223), backed by peft
(``preprocess_corda`` + ``init_lora_weights="corda"``).

Init: collect the covariance C = X^T X of every target layer's inputs over the calibration batches
(``ctx.calibration_batches()``), SVD the context-oriented product W0 C = U S V^T and map back
(V <- C^{-1} V). "ipm" (instruction-previewed) takes the r *largest* components as the adapter
(faster adaptation), "kpm" (knowledge-preserved) the r *smallest* (the large ones, which carry the
pre-trained knowledge, stay frozen). The frozen residual is W0 minus the adapter's part, so the
model is unchanged at step 0.
Hyper-parameters (peft ``CordaConfig`` defaults): corda_method "ipm"; the paper samples 256
calibration sequences (here ``train.init_batches`` batches). ``rank`` is shared with the LoRA
adapter (the same preset key sets both): peft's preprocessing needs it before the adapter exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lorabench.method_params.initializers import CordaParams
from lorabench.methods.base import Initializer, MethodContext
from lorabench.registry import INITIALIZERS

if TYPE_CHECKING:  # annotations only: peft loads when the method is built
    from peft.tuners.lora.config import CordaConfig


@INITIALIZERS.register("corda")
class CordaInit(Initializer):
    Params = CordaParams
    paper = "Yang et al., 2024, arXiv:2406.05223"
    backed_by = "peft"
    requires_adapter = ("lora",)
    rank_at_most_every_target = True  # its factors come from W (or W C): r <= min(d_out, d_in) (budget cap)

    def _config(self, params: CordaParams) -> CordaConfig:
        from peft.tuners.lora.config import CordaConfig

        return CordaConfig(corda_method=params.corda_method)

    def adapter_kwargs(self, params: CordaParams) -> dict:
        return {"init_lora_weights": "corda", "corda_config": self._config(params)}

    def before_adapter(self, model: nn.Module, params: CordaParams, ctx: MethodContext) -> None:
        from peft import LoraConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(
            r=params.rank,
            target_modules=ctx.target_modules,
            init_lora_weights="corda",
            corda_config=self._config(params),
        )
        seen = []

        @torch.no_grad()
        def run_model() -> None:
            # peft's covariance hook expects one sequence per forward; padding is dropped here
            for batch in ctx.calibration_batches():
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                for ids, keep in zip(batch["input_ids"], mask):
                    model(input_ids=ids[keep].unsqueeze(0))
                    seen.append(1)

        was_training = model.training
        model.eval()
        preprocess_corda(model, config, run_model=run_model)
        model.train(was_training)
        if not seen:
            raise ValueError("CorDA needs calibration batches (train.init_batches > 0)")
        ctx.extras["corda_sequences"] = len(seen)
