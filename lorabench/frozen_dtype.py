"""``hardware.frozen_dtype=bfloat16``: the frozen base model's Linear weights stored in bf16.

Under bf16 autocast (``hardware.mixed_precision=bf16``) every ``F.linear`` casts its float32 weight to
bf16, in the forward and again for the backward, every step. An adapter method never changes those
weights, so they can be stored in bf16 once, after the method is applied: the matmuls then read bf16
directly and the weights take half the memory. Autocast rounds a float32 weight to the nearest bf16
value, which is what the one-time cast stores, so the base's matmuls compute exactly what they did
under autocast alone.

What stays float32: every trainable tensor (adapters) and so its optimizer state; the embedding
matrix, also where the LM head is tied to it (a bf16 embedding would make the residual stream bf16);
norms, biases and buffers; and any weight the method created (an adapter's own frozen projections,
PiSSA-style residuals written into a new tensor): only parameters the loaded model already had are
cast. Full-weight methods (no adapter: full, GaLore family, LISA, BAdam) train the base itself and
are refused, since a layer-wise method would later train a bf16 tensor.
"""

from __future__ import annotations

from lorabench.errors import ConfigError

FROZEN_DTYPES = ("float32", "bfloat16")


def check_frozen_dtype(cfg, adapter: str) -> None:
    """Torch-free, on a ``RunConfig``: bf16 storage needs bf16 autocast (an fp32 input meets a bf16
    weight otherwise), an adapter method (a frozen base) and no forgetting probe (it scores the base
    in float32 before the method is applied, and the comparison would mix precisions)."""
    frozen, precision = cfg.hardware.frozen_dtype, cfg.hardware.mixed_precision
    if frozen == "float32":
        return
    if precision != "bf16":
        raise ConfigError(
            f"hardware.frozen_dtype={frozen} needs hardware.mixed_precision=bf16 (got {precision!r}): "
            "the bf16 base weights meet float32 activations otherwise"
        )
    if adapter == "none":
        raise ConfigError(
            f"hardware.frozen_dtype={frozen} stores the frozen base in bf16, but this method has no "
            "adapter and trains the base weights itself; use hardware.frozen_dtype=float32"
        )
    if cfg.analysis.forgetting:
        raise ConfigError(
            f"analysis.forgetting=true compares float32 perplexities before and after training; with "
            f"hardware.frozen_dtype={frozen} set analysis.forgetting=false or hardware.frozen_dtype=float32"
        )


def store_frozen_linears(
    model, dtype_name: str, base_params: set[int] | None = None, keep_float32: bool = False
) -> int:
    """Cast, in place, the weight of every ``nn.Linear`` in ``model`` that is frozen, not shared with
    an embedding and (when ``base_params`` is given: ids of the loaded model's parameters) was there
    before the method was applied. ``keep_float32``: round to ``dtype_name`` and store the rounded
    values in float32 (lorabench.export's rebuild of such a run). Returns the number of elements cast."""
    import torch
    from torch import nn

    if dtype_name == "float32":
        return 0
    dtype = getattr(torch, dtype_name)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    cast = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, nn.Parameter):
            continue
        if weight.requires_grad or id(weight) in embeddings or weight.dtype == dtype:
            continue
        if base_params is not None and id(weight) not in base_params:
            continue
        weight.data = weight.data.to(dtype).to(weight.dtype) if keep_float32 else weight.data.to(dtype)
        cast += weight.numel()
    return cast
