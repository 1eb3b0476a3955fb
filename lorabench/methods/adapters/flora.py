"""FLoRA, low-rank core space (Si et al., 2024, "FLoRA: Low-Rank Core Space for N-dimension",
arXiv:2405.14739; the arXiv id is from memory, not verified), our own layer (slora.TriLayer), for 2-D linear weights.

Update rule: a Tucker decomposition of the weight change, which for a 2-D weight is
Delta W = s A G B^T with a trainable core G (r x r) and trainable factors A (d_out x r), B (d_in x r).
Init (our choice; the paper's init is not recorded in METHODS.md): A and B Kaiming uniform, G = 0, so
Delta W = 0 at step 0 (the first step moves only G). Trainable parameters per target:
r (d_in + d_out) + r^2, plus the task head. Hyper-parameters: rank r, alpha (s = alpha / r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import OwnAdapter, seeded_generator
from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


@dataclass
class FloraParams:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@ADAPTERS.register("flora")
class FloraAdapter(OwnAdapter):
    Params = FloraParams
    paper = "Si et al., 2024, arXiv:2405.14739"

    def make_layer(self, name: str, linear: nn.Linear, params: FloraParams, ctx: MethodContext) -> TriLayer:
        gen, r = seeded_generator(ctx.seed, name), params.rank
        left = kaiming_uniform(linear.out_features, r, gen)  # A (d_out x r)
        right = kaiming_uniform(r, linear.in_features, gen)  # B^T (r x d_in)
        return TriLayer(linear, left, torch.zeros(r, r), right, params.alpha / r)

    def layer_trainable(self, d_out: int, d_in: int, params: FloraParams) -> int:
        return params.rank * (d_in + d_out) + params.rank**2
