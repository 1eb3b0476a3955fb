"""SVFit (Sun et al., 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using
Singular Values", arXiv:2409.05926), our own layer.

Update rule: SVD W0 = U S V^T; the top-r singular vectors U_r, V_r stay frozen and the top-r singular
values become trainable: W = W_res + U_r diag(sigma) V_r^T with sigma initialised to S_r, i.e.
Delta W = U_r diag(sigma - S_r) V_r^T (the model is unchanged at step 0). Trainable parameters per
target: r, plus the task head.
Hyper-parameters: rank r; 0 (the preset) = every singular value, min(d_out, d_in) per target. The
paper takes the top r covering "over 99%" of each matrix's information and reports 16x fewer trainable
parameters than LoRA: on RoBERTa-base LoRA's 0.3M (r 8 on query/value) / 16 = 18.4K = 24 matrices x
768, every singular value of each; a fixed r below the width is a smaller SVFit. No official code was
found (METHODS.md), so this is our reading of the paper (fidelity "rule").

``DiagLayer`` (frozen L, R around a trainable diagonal, optionally times a scalar that trains or is
fixed) is shared with LoLDU.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import SvfitParams
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, check_rank, top_svd
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


class DiagLayer(AdapterLayer):
    """Delta W = z L diag(d) R - z0 L diag(d0) R with frozen L (d_out x r), R (r x d_in); z trains
    (from z0 = ``scalar``) with ``train_scalar``, else stays ``scalar`` (1 when None)."""

    def __init__(
        self,
        base: nn.Linear,
        left: torch.Tensor,
        diag: torch.Tensor,
        right: torch.Tensor,
        scalar: float | None = None,
        train_scalar: bool = True,
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.register_buffer("left", left.to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("right", right.to(device, dtype).contiguous(), persistent=False)
        self.diag = nn.Parameter(diag.to(device, dtype).clone())
        self.register_buffer("init_diag", diag.to(device, dtype).clone(), persistent=False)
        self.fixed_scalar = 1.0 if scalar is None or train_scalar else float(scalar)
        if scalar is not None and train_scalar:
            self.scalar = nn.Parameter(torch.tensor(float(scalar), device=device, dtype=dtype))
            self.register_buffer(
                "init_scalar", torch.tensor(float(scalar), device=device, dtype=dtype), persistent=False
            )
        else:
            self.scalar = None

    def core(self) -> torch.Tensor:
        if self.scalar is None:
            delta = self.diag - self.init_diag
            return delta if self.fixed_scalar == 1.0 else self.fixed_scalar * delta
        return self.scalar * self.diag - self.init_scalar * self.init_diag

    def delta_weight(self) -> torch.Tensor:
        return (self.left * self.core()) @ self.right

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.right.dtype) @ self.right.T
        return ((h * self.core()) @ self.left.T).to(x.dtype)


def full_or(rank: int, d_out: int, d_in: int) -> int:
    """``rank``, or min(d_out, d_in) for 0 (every singular value / every LDU pivot)."""
    return rank or min(d_out, d_in)


@ADAPTERS.register("svfit")
class SvfitAdapter(OwnAdapter):
    Params = SvfitParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Sun et al., 2024, arXiv:2409.05926"
    fidelity = Fidelity(
        reference="no released code (METHODS.md); arXiv:2409.05926 v1",
        status="rule",
        deviations=(
            "W0 is never modified: Delta W = U_r diag(sigma - S_r) V_r^T is added to it, the same function as the"
            " paper's W_res + U_r diag(sigma) V_r^T",
        ),
        unchecked=(
            "the paper's choice of r (covering over 99% of each matrix's information) is not implemented; the"
            " preset trains every singular value, which its 16x-fewer-than-LoRA count on RoBERTa-base implies",
        ),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: SvfitParams, ctx: MethodContext) -> DiagLayer:
        r = full_or(params.rank, linear.out_features, linear.in_features)
        check_rank(r, linear.out_features, linear.in_features, name)
        u, s, vh = top_svd(linear.weight, r)
        return DiagLayer(linear, u, s, vh)

    def layer_trainable(self, d_out: int, d_in: int, params: SvfitParams) -> int:
        return full_or(params.rank, d_out, d_in)
