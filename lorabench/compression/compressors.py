"""Compressors of one linear layer's weight, each registered in ``COMPRESSORS`` by name.

A compressor takes an ``nn.Linear`` and the protocol's settings and returns :class:`Compressed`: the
module that replaces the layer, the compressed weight as a dense float tensor (what the layer now
computes with: the error ``W - W_c`` and the compensation are taken from it) and the bytes the
compressed weight takes when stored.

* ``hqq``: Half-Quadratic Quantization (Badri & Shaji 2023; the ``hqq`` package, a real packed
  format: 4-bit values two per byte, plus a scale and a zero point per group of ``group_size``).
  The layer becomes ``hqq.core.quantize.HQQLinear``, which dequantizes on the fly and which peft
  wraps as ``HqqLoraLinear``: QLoRA's frozen 4-bit base, on CPU and GPU alike. HQQ needs no
  calibration data (it solves for the zero point per group by a half-quadratic proximal method).
* ``magnitude``: unstructured magnitude pruning, the ``sparsity`` share of the smallest |w| per
  matrix set to 0 (``torch.nn.utils.prune.l1_unstructured``, then made permanent). Stored as the
  kept values plus a one-bit mask per entry.
* ``semi_structured``: N:M pruning (2:4 by default, as the EoRA paper's sparse models): in every
  group of M consecutive input weights of a row the N largest |w| are kept
  (``torch.nn.utils.prune.custom_from_mask``). Stored as the kept values plus a 2-bit position per
  kept value (the layout of sparse tensor cores for 2:4). On CPU the zeros are computed densely.

Biases stay in float and are counted in neither size.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lorabench.compression import COMPRESSORS


@dataclasses.dataclass
class Compressed:
    module: nn.Module  # replaces the linear layer in the model
    weight: torch.Tensor  # the compressed weight, dense, in the layer's dtype (out x in)
    stored_bytes: int  # bytes of the compressed weight as stored (values, scales, zeros, masks)


@COMPRESSORS.register("hqq")
def hqq_quantize(linear: nn.Linear, settings) -> Compressed:
    """W -> HQQ's ``nbits``-bit codes with a scale and zero point per group of ``group_size``
    weights along the input dimension (its ``axis=1``, the layout HQQ's kernels and peft's
    ``HqqLoraLinear`` take), computed in the weight's dtype."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    device = str(linear.weight.device)
    quant_config = BaseQuantizeConfig(nbits=settings.bits, group_size=settings.group_size)
    layer = HQQLinear(
        linear, quant_config=quant_config, compute_dtype=linear.weight.dtype, device=device, del_orig=True
    )
    weight = layer.dequantize().to(layer.compute_dtype)
    stored = layer.W_q.numel() * layer.W_q.element_size()
    stored += sum(t.numel() * t.element_size() for t in (layer.meta["scale"], layer.meta["zero"]))
    return Compressed(layer, weight.detach(), stored)


@COMPRESSORS.register("magnitude")
def magnitude_prune(linear: nn.Linear, settings) -> Compressed:
    """The ``sparsity`` share of the matrix's smallest |w| set to zero (ties broken by torch.topk)."""
    from torch.nn.utils import prune

    prune.l1_unstructured(linear, "weight", amount=settings.sparsity)
    prune.remove(linear, "weight")
    weight = linear.weight.detach()
    kept = int(torch.count_nonzero(weight))
    return Compressed(linear, weight, kept * weight.element_size() + math.ceil(weight.numel() / 8))


def n_of_m_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The mask keeping the ``n`` largest |w| of every group of ``m`` consecutive input weights."""
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"{n}:{m} pruning needs the input size ({in_features}) to be a multiple of {m}")
    groups = weight.detach().abs().reshape(out_features, in_features // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


@COMPRESSORS.register("semi_structured")
def semi_structured_prune(linear: nn.Linear, settings) -> Compressed:
    """N:M magnitude pruning along the input dimension (``settings.n_of_m``, e.g. [2, 4])."""
    from torch.nn.utils import prune

    n, m = settings.n_of_m
    prune.custom_from_mask(linear, "weight", n_of_m_mask(linear.weight, n, m))
    prune.remove(linear, "weight")
    weight = linear.weight.detach()
    kept = weight.numel() * n // m
    position_bits = max(1, math.ceil(math.log2(m)))
    return Compressed(linear, weight, kept * weight.element_size() + math.ceil(kept * position_bits / 8))
