"""Hydra (Kim et al., 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", arXiv:2309.06922), our own layer. Registered as ``hydra_lora`` (not to be confused
with the Hydra config framework).

Update rule: a parallel LoRA branch plus a sequential branch on the pretrained features:
h = W0 x + b + s (B_p A_p x + B_s A_s W0 x), i.e. Delta W = s (B_p A_p + B_s A_s W0). A_p (r x d_in)
and A_s (r x d_out) are Kaiming uniform, B_p and B_s (d_out x r) start at 0 (Delta W = 0 at step 0).
The sequential branch reads W0 x without the bias, so the update is linear and mergeable.
Trainable parameters per target: r (d_in + d_out) + 2 r d_out, plus the task head.
Hyper-parameters: rank r (both branches), alpha (s = alpha / r).
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


class HydraLayer(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, scale: float, generator: torch.Generator):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        d_out, d_in = base.out_features, base.in_features
        self.par_A = nn.Parameter(kaiming_uniform(r, d_in, generator).to(device, dtype))
        self.par_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        self.seq_A = nn.Parameter(kaiming_uniform(r, d_out, generator).to(device, dtype))
        self.seq_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        self.scale = scale
        self._merged_delta: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        if self._merged_delta is not None:  # W0 is inside base.weight now
            return self._merged_delta
        w0 = self.base.weight.to(self.seq_A.dtype)
        return self.scale * (self.par_B @ self.par_A + self.seq_B @ (self.seq_A @ w0))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.par_A.dtype)
        features = nn.functional.linear(h, self.base.weight.to(h.dtype))  # W0 x without bias
        out = (h @ self.par_A.T) @ self.par_B.T + (features @ self.seq_A.T) @ self.seq_B.T
        return (self.scale * out).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            delta = self.delta_weight().detach().clone()
            self.base.weight.add_(delta.to(self.base.weight.dtype))
            self._merged_delta, self.merged = delta, True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self._merged_delta.to(self.base.weight.dtype))
            self._merged_delta, self.merged = None, False


@dataclass
class HydraParams:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@ADAPTERS.register("hydra_lora")
class HydraAdapter(OwnAdapter):
    Params = HydraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Kim et al., 2024, arXiv:2309.06922"

    def make_layer(self, name: str, linear: nn.Linear, params: HydraParams, ctx: MethodContext) -> HydraLayer:
        return HydraLayer(linear, params.rank, params.alpha / params.rank, seeded_generator(ctx.seed, name))

    def layer_trainable(self, d_out: int, d_in: int, params: HydraParams) -> int:
        return params.rank * (d_in + d_out) + 2 * params.rank * d_out
