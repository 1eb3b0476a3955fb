"""LaMDA (Azizi et al., 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation", arXiv:2406.12832, EMNLP 2024 Findings), our own layer (slora.TriLayer).

Update rule: y = W0 x + s PMB S PMA x with PMA (r x d_in) frozen, a trainable square core S (r x r)
and PMB (d_out x r) trainable at first and frozen progressively during the early stage of training
(the ``lamda`` procedure, lorabench/methods/procedures/lamda.py). Trainable parameters per target
(at the start): r d_out + r^2, plus the task head.
Init (our reading of "spectrally decomposed"; the paper's exact init is not recorded in METHODS.md):
SVD W0 = U S V^T, PMA = V_r^T, PMB = U_r, S0 = diag(S_r) / s, and the initial product is subtracted
(Delta W = s (PMB S PMA - PMB0 S0 PMA)), so the model is unchanged at step 0.
Not implemented: LaMDA++'s per-layer rank allocation from the normalised spectrum energy.
Hyper-parameters: rank r, alpha (s = alpha / r); the freezing window lives in the procedure.
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


class LamdaLayer(TriLayer):
    """TriLayer with B = PMB (trainable), M = S (trainable), A = PMA (frozen)."""


@dataclass
class LamdaParams:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@ADAPTERS.register("lamda")
class LamdaAdapter(OwnAdapter):
    Params = LamdaParams
    paper = "Azizi et al., 2024, arXiv:2406.12832"

    def make_layer(self, name: str, linear: nn.Linear, params: LamdaParams, ctx: MethodContext) -> LamdaLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        scale = params.alpha / params.rank
        u, s, vh = top_svd(linear.weight, params.rank)
        return LamdaLayer(linear, u, torch.diag(s / scale), vh, scale, train=("B", "M"), subtract_init=True)

    def layer_trainable(self, d_out: int, d_in: int, params: LamdaParams) -> int:
        return params.rank * d_out + params.rank**2
