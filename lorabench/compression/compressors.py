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

* ``welore``: WeLore's non-uniform low-rank factorisation (:func:`welore_plan`): matrices with a
  heavy spectral tail become trainable factors (``LowRankLinear``), the rest stay dense; a WeLore
  run trains only those factors (and a classification head), with an adapter-free method.

A compressor may carry ``plan(layers, settings) -> {layer: keyword arguments}``, a pass over all
layers before any is compressed (WeLore's global threshold). Biases stay in float and are counted
in neither size.
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


_HQQ_LINEAR = None


def hqq_linear_class():
    """``hqq``'s ``HQQLinear`` with its matmul in the dtype of what it multiplies. HQQ's own
    backward multiplies the incoming gradient by the dequantized weight outside autocast (a bf16
    gradient against a float32 weight fails), and evaluation without autocast meets a bf16 weight
    with float32 inputs; casting the dequantized weight to the other operand's dtype serves both.
    peft still wraps it as ``HqqLoraLinear`` (a subclass)."""
    global _HQQ_LINEAR
    if _HQQ_LINEAR is None:
        from hqq.core.quantize import HQQLinear as BaseHQQLinear

        class HQQLinear(BaseHQQLinear):  # the name peft's layer-size lookup matches
            """HQQ's layer, multiplying in the dtype of the other operand."""

            def matmul(self, x: torch.Tensor, transpose: bool = True) -> torch.Tensor:
                weight = self.dequantize().to(x.dtype)
                return torch.matmul(x, weight.t() if transpose else weight)

        _HQQ_LINEAR = HQQLinear
    return _HQQ_LINEAR


@COMPRESSORS.register("hqq")
def hqq_quantize(linear: nn.Linear, settings, compute_dtype: torch.dtype | None = None) -> Compressed:
    """W -> HQQ's ``nbits``-bit codes with a scale and zero point per group of ``group_size``
    weights along the input dimension (its ``axis=1``, the layout HQQ's kernels and peft's
    ``HqqLoraLinear`` take), dequantized to ``compute_dtype`` (default: the weight's dtype; the
    protocol passes the autocast dtype under mixed precision, as QLoRA computes in bf16)."""
    from hqq.core.quantize import BaseQuantizeConfig

    device = str(linear.weight.device)
    quant_config = BaseQuantizeConfig(nbits=settings.bits, group_size=settings.group_size)
    layer = hqq_linear_class()(
        linear,
        quant_config=quant_config,
        compute_dtype=compute_dtype or linear.weight.dtype,
        device=device,
        del_orig=True,
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


class LowRankLinear(nn.Module):
    """y = U (V x) + b: a weight stored as two trainable factors (WeLore's low-rank components)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.down = nn.Linear(v.shape[1], v.shape[0], bias=False, device=v.device, dtype=v.dtype)
        self.up = nn.Linear(u.shape[1], u.shape[0], bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            self.down.weight.copy_(v)
            self.up.weight.copy_(u)
            if bias is not None:
                self.up.bias.copy_(bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def welore_plan(layers: dict[str, nn.Linear], settings) -> dict[str, dict]:
    """WeLore's ranks (Jaiswal et al. 2024, "From GaLore to WeLore: How Low-Rank Weights
    Non-uniformly Emerge from Low-Rank Gradients"; VITA-Group/welore ``adaptive_rank_pruning`` and
    ``do_rank_reduction``): each matrix's singular values are min-max normalised to [0, 1] and the
    ones below a threshold τ are pruned; a matrix whose pruned share exceeds ``welore_min_ratio``
    becomes a low-rank component (LRC) of rank full - pruned, the others stay dense and frozen.
    The reference reads τ from a table per model and target; here τ is the smallest threshold
    whose attempted reduction (pruned ranks over all ranks, as the reference logs it) reaches
    ``welore_reduction``, found by bisection. Returns {layer: {"keep_rank": k or None}}."""
    spectra = normalised_spectra(layers)
    tau = welore_threshold(spectra, settings.welore_reduction)
    counts = pruned_ranks(spectra, tau)
    plan = {}
    for name, s in spectra.items():
        full = s.numel()
        plan[name] = {"keep_rank": full - counts[name] if counts[name] / full > settings.welore_min_ratio else None}
    return plan


def normalised_spectra(layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Each weight's singular values (float32), min-max normalised to [0, 1]."""
    out = {}
    for name, m in layers.items():
        s = torch.linalg.svdvals(m.weight.detach().float())
        out[name] = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-30)
    return out


def pruned_ranks(spectra: dict[str, torch.Tensor], tau: float) -> dict[str, int]:
    """How many normalised singular values of each matrix fall below ``tau`` (the ranks pruned)."""
    return {name: int((s < tau).sum()) for name, s in spectra.items()}


def welore_threshold(spectra: dict[str, torch.Tensor], reduction: float) -> float:
    """The smallest τ (to 2⁻⁶⁰) whose pruned ranks make at least ``reduction`` of all ranks."""
    total = sum(s.numel() for s in spectra.values())
    low, high = 0.0, 1.0 + 1e-6
    for _ in range(60):
        mid = (low + high) / 2
        if sum(pruned_ranks(spectra, mid).values()) / total >= reduction:
            high = mid
        else:
            low = mid
    return high


@COMPRESSORS.register("welore")
def welore_factorize(linear: nn.Linear, settings, keep_rank: int | None = None) -> Compressed:
    """An LRC (``keep_rank`` set): W ≈ U_k Σ_k V_kᵀ as ``LowRankLinear`` with up = U_k Σ_k^½ and
    down = Σ_k^½ V_kᵀ (the reference's ``LowRankLayer``, which also casts them to bf16; here they
    keep the weight's dtype), stored as k (in + out) values. An N-LRC (None): the layer as it is."""
    weight = linear.weight.detach()
    if keep_rank is None:
        return Compressed(linear, weight, weight.numel() * weight.element_size())
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:keep_rank].sqrt()
    up, down = (u[:, :keep_rank] * root).to(weight.dtype), (root[:, None] * vh[:keep_rank]).to(weight.dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    layer = LowRankLinear(up, down, bias)
    return Compressed(layer, (up @ down).detach(), (up.numel() + down.numel()) * weight.element_size())


welore_factorize.plan = welore_plan
