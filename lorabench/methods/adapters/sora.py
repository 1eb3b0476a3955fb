"""SoRA, Sparse Low-rank Adaptation (Ding et al., 2023, "Sparse Low-rank Adaptation of Pre-trained
Language Models", arXiv:2311.11696), our own layer.

Update rule: Delta W = s B diag(g) A with B (d_out x r_max, zero init), A (r_max x d_in, Kaiming
uniform) and a gate g (r_max, init N(0, 1) as the authors' ``LowRankLinear``), s = alpha / r_max. A,
B and g train with the run's optimizer (AdamW; g is 1-D so it gets no weight decay); after every
optimizer step the ``sora`` procedure applies the proximal (soft-threshold) step of the L1 penalty
to g: g <- sign(g) max(|g| - eta lambda, 0). The authors' ``SparseAdamW`` thresholds by a fixed
lambda per step (eta = 1, ``lambda_times_lr: false``, the default here); the paper's proximal-SGD
form uses eta = the gate's learning rate (``lambda_times_lr: true``). ``prune()`` drops the ranks
whose gate is 0 and folds g into B, which leaves the layer's output unchanged. Trainable parameters
per target: r_max (d_in + d_out + 1), plus the task head.
Hyper-parameters (authors' GLUE script, DeBERTaV3-base): r_max = 8, lr 8e-4, weight decay 0.1,
max_grad_norm 0.1, ``--sparse_lambda_2 3e-4`` (read here as the SparseAdamW threshold lambda; the
script's ``--sparse_lambda 10`` is not used: its role is uncertain), optional lambda schedule
(linear from lambda to max_lambda in lambda_num stages over the run); lora_alpha 16 (authors' default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


class SoraLayer(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.lora_A = nn.Parameter(kaiming_uniform(r, base.in_features, generator).to(device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.randn(r, generator=generator).to(device, dtype))
        self.scale = alpha / r

    def rank(self) -> int:
        return int(torch.count_nonzero(self.gate).item()) if self.gate is not None else self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        b = self.lora_B if self.gate is None else self.lora_B * self.gate
        return self.scale * b @ self.lora_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype) @ self.lora_A.T
        if self.gate is not None:
            h = h * self.gate
        return (self.scale * h @ self.lora_B.T).to(x.dtype)

    @torch.no_grad()
    def prune(self) -> int:
        """Remove zero-gate ranks and fold g into B; afterwards no gate remains. Returns the rank."""
        if self.gate is None:
            return self.lora_A.shape[0]
        keep = self.gate != 0
        self.lora_A = nn.Parameter(self.lora_A[keep].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(
            (self.lora_B[:, keep] * self.gate[keep]).clone(), requires_grad=self.lora_B.requires_grad
        )
        del self.gate
        self.gate = None
        return int(keep.sum())


def prune_model(model: nn.Module) -> dict[str, int]:
    """``prune()`` every SoRA layer; returns the surviving rank per layer. Build the optimizer anew afterwards."""
    return {name: m.prune() for name, m in model.named_modules() if isinstance(m, SoraLayer)}


@dataclass
class SoraParams:
    rank: int = 8  # r_max
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@ADAPTERS.register("sora")
class SoraAdapter(OwnAdapter):
    Params = SoraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Ding et al., 2023, arXiv:2311.11696"

    def make_layer(self, name: str, linear: nn.Linear, params: SoraParams, ctx: MethodContext) -> SoraLayer:
        return SoraLayer(linear, params.rank, params.alpha, seeded_generator(ctx.seed, name))

    def layer_trainable(self, d_out: int, d_in: int, params: SoraParams) -> int:
        return params.rank * (d_in + d_out + 1)
