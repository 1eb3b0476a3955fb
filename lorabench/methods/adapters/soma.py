"""SoMA / MiLoRA: LoRA initialised from the *minor* singular components of W0, our own layer.

* SoMA (Yun et al., 2025, "SoMA: Singular Value Decomposed Minor Components Adaptation for Domain
  Generalizable Representation Learning", arXiv:2412.04077) and
* MiLoRA (Wang et al., 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
  LLM Fine-Tuning", arXiv:2406.09044) share this init.

Init: SVD W0 = U S V^T; the r *smallest* triplets give B0 = U_min sqrt(S_min / s) (d_out x r) and
A0 = sqrt(S_min / s) V_min^T (r x d_in), s = alpha / r, so s B0 A0 = U_min S_min V_min^T. B and A
train; the residual W0 - s B0 A0 stays frozen, implemented as Delta W = s (B A - B0 A0) with frozen
copies of the initial factors (the model is unchanged at step 0, W0 itself is never modified).
Trainable parameters per target: r (d_in + d_out), plus the task head.
Hyper-parameters: rank r, alpha. Not implemented: SoMA's freezing of the early blocks and its
annealed weight decay (vision-specific parts of the paper's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.layer import OwnAdapter, check_rank, top_svd
from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


@dataclass
class MinorParams:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


class MinorComponentsAdapter(OwnAdapter):
    Params = MinorParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)

    def make_layer(self, name: str, linear: nn.Linear, params: MinorParams, ctx: MethodContext) -> TriLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        scale = params.alpha / params.rank
        u, s, vh = top_svd(linear.weight, params.rank, smallest=True)
        root = torch.sqrt(s / scale)
        b, a = u * root, root[:, None] * vh
        return TriLayer(linear, b, torch.eye(params.rank), a, scale, train=("B", "A"), subtract_init=True)

    def layer_trainable(self, d_out: int, d_in: int, params: MinorParams) -> int:
        return params.rank * (d_in + d_out)


@ADAPTERS.register("soma")
class SomaAdapter(MinorComponentsAdapter):
    paper = "Yun et al., 2025, arXiv:2412.04077"


@ADAPTERS.register("milora")
class MiloraAdapter(MinorComponentsAdapter):
    paper = "Wang et al., 2024, arXiv:2406.09044"
