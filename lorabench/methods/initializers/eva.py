"""EVA (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation", arXiv:2410.07170), backed by peft (``init_lora_weights="eva"`` +
``initialize_lora_eva_weights``).

Init: stream the calibration batches (``ctx.calibration_batches()``, i.e. ``train.init_batches``
training batches, cycled until convergence) through the model and run an incremental SVD of every
target layer's input activations X (padding masked; for causal LMs also tokens whose label is
-100). A = top right-singular vectors of X, B = 0, so the model is unchanged at step 0. Rank
redistribution: rho * r components per layer are ranked globally by explained variance and the
top L * r kept, so a layer gets rank 0 .. rho * r (reported as ``rank_pattern``); with
``adjust_scaling_factors`` alpha is rescaled per layer so alpha / r stays constant.
Hyper-parameters (peft ``EvaConfig`` defaults): rho 2.0 (1.0 = uniform ranks), tau 0.99 (cosine
threshold for convergence of the components between batches), use_label_mask True, whiten False,
adjust_scaling_factors True.
The LoRA adapter's closed-form count (r per layer) holds after redistribution only when all
targets have one shape (the total rank L * r is kept, its split is not).
"""

from __future__ import annotations

from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.initializers import EvaParams
from lorabench.methods.base import Initializer, MethodContext, target_linear_weights
from lorabench.registry import INITIALIZERS


def _model_inputs(batch: dict, peft_config) -> object:
    """peft's token mask, minus sequence-level labels (classification labels are not per token)."""
    from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling

    labels = batch.get("labels")
    if labels is not None and labels.shape != batch["input_ids"].shape:
        batch = {k: v for k, v in batch.items() if k != "labels"}
    return prepare_model_inputs_fn_language_modeling(batch, peft_config)


@INITIALIZERS.register("eva")
class EvaInit(Initializer):
    Params = EvaParams
    paper = "Paischer et al., 2024, arXiv:2410.07170"
    backed_by = "peft"
    requires_adapter = ("lora",)

    def adapter_kwargs(self, params: EvaParams) -> dict:
        from peft import EvaConfig

        config = EvaConfig(
            rho=params.rho,
            tau=params.tau,
            use_label_mask=params.use_label_mask,
            whiten=params.whiten,
            adjust_scaling_factors=params.adjust_scaling_factors,
        )
        return {"init_lora_weights": "eva", "eva_config": config}

    def after_adapter(self, model: nn.Module, params: EvaParams, ctx: MethodContext) -> None:
        from peft import initialize_lora_eva_weights

        batches = list(ctx.calibration_batches())
        if not batches:
            raise ValueError("EVA needs calibration batches (train.init_batches > 0)")
        check_enough_tokens(batches, model.peft_config["default"], params)
        initialize_lora_eva_weights(
            model, dataloader=batches, prepare_model_inputs_fn=_model_inputs, show_progress_bar=False
        )
        ctx.extras["rank_pattern"] = layer_ranks(model, ctx.target_modules)


def check_enough_tokens(batches: list[dict], peft_config, params: EvaParams) -> None:
    """peft's incremental SVD skips a batch with fewer SVD tokens (after masking) than the rho * r
    components it keeps, and cycles the batches until every layer converges: with no batch large
    enough it would loop forever, so that is a ConfigError."""
    need = round(peft_config.r * params.rho)
    counts = [len(_model_inputs(batch, peft_config)) for batch in batches]
    if max(counts) < need:
        raise ConfigError(
            f"EVA needs a calibration batch with at least rho * r = {need} tokens (method.rho={params.rho}, "
            f"method.rank={peft_config.r}); the largest of the {len(batches)} has {max(counts)}: lower method.rank "
            f"or method.rho, or raise hardware.micro_batch_size"
        )


def layer_ranks(model: nn.Module, targets: list[str]) -> dict[str, int]:
    """The LoRA rank of every targeted layer after EVA's redistribution (peft's own ``rank_pattern``
    lists only the layers whose rank differs from r; EVA unwraps rank-0 layers, reported as 0)."""
    ranks = {
        name.removeprefix("base_model.model."): int(m.r["default"])
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})
    }
    for name, _ in target_linear_weights(model, targets):  # plain Linear again: rank 0
        ranks[name.removesuffix(".weight").removeprefix("base_model.model.")] = 0
    return ranks
