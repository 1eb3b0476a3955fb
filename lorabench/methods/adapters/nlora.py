"""NLoRA, Nystrom-initiated LoRA (Guo et al., 2025, "NLoRA: Nystrom-Initiated Low-Rank Adaptation for
Large Language Models", arXiv:2502.14482), our own layer (SLoRA's three factors, slora.py).

Update rule: Delta W = s (B M A - B0 M0 A0) with B (d_out x r), M (r x r), A (r x d_in) all trainable.
Nystrom init from W0 with the index sets I = J = {first r rows / columns} (as the authors'
``nlora_init``): B0 = W0[:, J], A0 = W0[I, :], M0 = pinv(W0[I, J]) / s, so s B0 M0 A0 = C W_IJ^+ R is
the Nystrom approximation of W0 (no SVD). Residual handling (METHODS.md: uncertain): the initial
product is subtracted (a frozen copy of the initial factors), so the model is unchanged at step 0,
like PiSSA's residual. Note: the authors' code snapshot copies W0[I, J] into M without the pinv and
keeps W0 unchanged; ``pinv: false`` uses M0 = W0[I, J] / s.
Trainable parameters per target: r (d_in + d_out) + r^2, plus the task head.
Hyper-parameters: rank r, alpha (s = alpha / r), pinv, pinv_rcond (cut-off for the pseudo-inverse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.layer import OwnAdapter, check_rank
from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


def nystrom_factors(w: torch.Tensor, r: int, scale: float, pinv: bool = True, rcond: float = 1e-4):
    """(C, M, R) with s C M R the Nystrom approximation of W from its first r rows and columns."""
    w = w.detach().float()
    core = w[:r, :r]
    m = torch.linalg.pinv(core, rtol=rcond) if pinv else core
    return w[:, :r].clone(), m / scale, w[:r, :].clone()


@dataclass
class NloraParams:
    rank: int = 8
    alpha: float = 16.0
    pinv: bool = True
    pinv_rcond: float = 1.0e-4

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@ADAPTERS.register("nlora")
class NloraAdapter(OwnAdapter):
    Params = NloraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Guo et al., 2025, arXiv:2502.14482"
    train = ("B", "M", "A")

    def make_layer(self, name: str, linear: nn.Linear, params: NloraParams, ctx: MethodContext) -> TriLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        scale = params.alpha / params.rank
        b, m, a = nystrom_factors(linear.weight, params.rank, scale, params.pinv, params.pinv_rcond)
        return TriLayer(linear, b, m, a, scale, train=self.train, subtract_init=True)

    def layer_trainable(self, d_out: int, d_in: int, params: NloraParams) -> int:
        return params.rank * (d_in + d_out) + params.rank**2
