"""LoLDU (Shi et al., 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv:2410.13618), our own layer (svfit.DiagLayer). Authors' code:
SKDDJ/LoLDU (minloldu/loldu.py, ``LoLDUParametrization``).

Init: pivoted LU of W0 (torch.linalg.lu): W0 = P L U; D = diag(U), U' = D^-1 U (unit diagonal), so
W0 = (P L) D U'. Keep the r leading factors L_r = (P L)[:, :r] (d_out x r) and U_r = U'[:r, :]
(r x d_in) frozen and train the diagonal z (r, init D_r) under a fixed scale sigma = alpha / r:
W = W_res + sigma L_r diag(z) U_r with W_res = W0 - sigma L_r diag(D_r) U_r, i.e.
Delta W = sigma L_r diag(z - D_r) U_r (W0 itself is never modified; the same function). This is the
authors' code: its ``from_linear`` scale lora_alpha / rank with lora_alpha = 1, its trainable set
``vector_z`` only (the scaling factor is a tensor of the layer but stays out of ``get_loldu_params``),
and its default configuration rank 768, every pivot of a base model's 768-wide weights.
Zero pivots (D_i = 0) keep U's row unscaled. Trainable parameters per target: r (+ 1 with
``train_scalar``), plus the task head.
Hyper-parameters: rank r (0, the preset: every pivot, min(d_out, d_in) per target), alpha (sigma =
alpha / r), train_scalar (also train sigma, from alpha / r).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import LolduParams
from lorabench.methods.adapters.layer import OwnAdapter, check_rank
from lorabench.methods.adapters.svfit import DiagLayer, full_or
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


def ldu_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_r, D_r, U_r) from the pivoted LU of W (float32)."""
    p, lower, upper = torch.linalg.lu(w.detach().float())
    d = torch.diagonal(upper)[:r].clone()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return (p @ lower)[:, :r].contiguous(), d, upper[:r, :] / safe[:, None]


@ADAPTERS.register("loldu")
class LolduAdapter(OwnAdapter):
    Params = LolduParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Shi et al., 2024, arXiv:2410.13618"
    fidelity = Fidelity(
        reference="SKDDJ/LoLDU@4fe87a05a668 (minloldu/loldu.py LoLDUParametrization, loldu_utils.py)",
        status="parity",
        tolerance="max |Δ| / max(1, |ref|) <= 1e-6 of outputs, gradients, z over 12 steps (fp32, CPU)",
        fixture="tests/fixtures/parity/loldu.json",
        deviations=(
            "W0 stays as it is and the update sigma L_r diag(z - D_r) U_r is added; the reference overwrites the"
            " weight with W0 - sigma L_r diag(D_r) U_r and adds sigma L_r diag(z) U_r (the same function)",
            "a zero pivot keeps its row of U unscaled (the reference divides by it)",
        ),
        unchecked=("the reference's LoRA-style init option and its non-'lu' vector_z inits (not its defaults)",),
        revision=2,
    )

    def make_layer(self, name: str, linear: nn.Linear, params: LolduParams, ctx: MethodContext) -> DiagLayer:
        r = full_or(params.rank, linear.out_features, linear.in_features)
        check_rank(r, linear.out_features, linear.in_features, name)
        left, d, right = ldu_factors(linear.weight, r)
        return DiagLayer(linear, left, d, right, scalar=params.alpha / r, train_scalar=params.train_scalar)

    def layer_trainable(self, d_out: int, d_in: int, params: LolduParams) -> int:
        return full_or(params.rank, d_out, d_in) + (1 if params.train_scalar else 0)
