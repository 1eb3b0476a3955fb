"""FLoRA, low-rank core space (Si et al., 2024, "FLoRA: Low-Rank Core Space for N-dimension",
arXiv:2405.14739), our own layer (slora.TriLayer), for 2-D linear weights.

Update rule: a Tucker decomposition of the weight change, which for a 2-D weight is
Delta W = s A G B^T with a trainable core G (r x r) and trainable factors A (d_out x r), B (d_in x r).
Init (as the authors' ``FLoRALayer.init_parameters``): A and B Kaiming normal with a = sqrt(3) over
their rank dimension, i.e. N(0, 1 / (2 r)), and G = 0, so Delta W = 0 at step 0 (the first step moves
only G). Trainable parameters per target: r (d_in + d_out) + r^2, plus the task head.
Hyper-parameters: rank r, scale s (a plain multiplier, as the authors' ``scale``; 1.0 here).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.method_params.adapters import FloraParams
from lorabench.methods.adapters.layer import OwnAdapter, seeded_generator
from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


@ADAPTERS.register("flora")
class FloraAdapter(OwnAdapter):
    Params = FloraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Si et al., 2024, arXiv:2405.14739"

    def make_layer(self, name: str, linear: nn.Linear, params: FloraParams, ctx: MethodContext) -> TriLayer:
        gen, r = seeded_generator(ctx.seed, name), params.rank
        std = 1.0 / math.sqrt(2 * r)
        left = torch.randn(linear.out_features, r, generator=gen) * std  # A (d_out x r)
        right = torch.randn(r, linear.in_features, generator=gen) * std  # B^T (r x d_in)
        return TriLayer(linear, left, torch.zeros(r, r), right, params.scale)

    def layer_trainable(self, d_out: int, d_in: int, params: FloraParams) -> int:
        return params.rank * (d_in + d_out) + params.rank**2
