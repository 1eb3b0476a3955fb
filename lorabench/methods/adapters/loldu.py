"""LoLDU (Shi et al., 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv:2410.13618), our own layer (svfit.DiagLayer).

Init: pivoted LU of W0 (torch.linalg.lu): W0 = P L U; D = diag(U), U' = D^-1 U (unit diagonal), so
W0 = (P L) D U'. Keep the r leading factors L_r = (P L)[:, :r] (d_out x r) and U_r = U'[:r, :] (r x d_in)
frozen; train the diagonal d (r, init D_r) and a scalar z (init 1):
Delta W = z L_r diag(d) U_r - z0 L_r diag(d0) U_r. METHODS.md marks how the initial value is handled
as uncertain: here it is subtracted, so the model is unchanged at step 0 (W0 is never modified).
Zero pivots (D_i = 0) keep U's row unscaled. Trainable parameters per target: r + 1, plus the task head.
Hyper-parameters: rank r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.layer import OwnAdapter, check_rank
from lorabench.methods.adapters.svfit import DiagLayer
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


def ldu_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_r, D_r, U_r) from the pivoted LU of W (float32)."""
    p, lower, upper = torch.linalg.lu(w.detach().float())
    d = torch.diagonal(upper)[:r].clone()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return (p @ lower)[:, :r].contiguous(), d, upper[:r, :] / safe[:, None]


@dataclass
class LolduParams:
    rank: int = 8

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)


@ADAPTERS.register("loldu")
class LolduAdapter(OwnAdapter):
    Params = LolduParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Shi et al., 2024, arXiv:2410.13618"

    def make_layer(self, name: str, linear: nn.Linear, params: LolduParams, ctx: MethodContext) -> DiagLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        left, d, right = ldu_factors(linear.weight, params.rank)
        return DiagLayer(linear, left, d, right, scalar=1.0)

    def layer_trainable(self, d_out: int, d_in: int, params: LolduParams) -> int:
        return params.rank + 1
