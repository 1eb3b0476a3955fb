"""SALT (Elsayed et al., 2025, "SALT: Singular Value Adaptation with Low-Rank Transformation",
arXiv:2503.16055), our own layer.

Update rule: SVD W0 = U S V^T (k = min(d_out, d_in) components). The top-r singular values get a
trainable scale and shift, sigma'_i = a_i sigma_i + b_i (a init 1, b init 0), and the remaining
k - r singular directions get a low-rank update of their singular-value block, S_rest + X Y with
X ((k - r) x q) and Y (q x (k - r)) ~ N(0, 0.01^2) as in the authors' code:
Delta W = U_r diag((a - 1) sigma + b) V_r^T + U_rest (X Y - X0 Y0) V_rest^T.
Implemented detail: the authors' small random X0 Y0 perturbs the model at step 0; here the initial
product is subtracted (a frozen copy of X0, Y0), so the model is unchanged at step 0 and the
gradients are the same. U and V (the full SVD, as large as W0) are non-persistent buffers that
regenerate from W0. Trainable parameters per target: 2 r + 2 q (k - r), plus the task head.
Hyper-parameters: rank r (scaled/shifted singular values), lora_rank q. The paper's setting is
medical image segmentation (SAM) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, check_rank, seeded_generator, top_svd
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


class SaltLayer(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, q: int, generator: torch.Generator):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        u, s, vh = top_svd(base.weight, min(base.out_features, base.in_features))
        rest = s.numel() - r
        self.r = r
        self.register_buffer("sv_U", u.to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("sv_S", s[:r].to(device, dtype), persistent=False)
        self.register_buffer("sv_Vh", vh.to(device, dtype).contiguous(), persistent=False)
        self.sv_scale = nn.Parameter(torch.ones(r, device=device, dtype=dtype))
        self.sv_shift = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        x0 = (torch.randn(rest, q, generator=generator) * 0.01).to(device, dtype)
        y0 = (torch.randn(q, rest, generator=generator) * 0.01).to(device, dtype)
        self.lora_X, self.lora_Y = nn.Parameter(x0.clone()), nn.Parameter(y0.clone())
        self.register_buffer("init_X", x0, persistent=False)
        self.register_buffer("init_Y", y0, persistent=False)

    def spectrum_delta(self) -> torch.Tensor:
        return (self.sv_scale - 1) * self.sv_S + self.sv_shift

    def rest_delta(self) -> torch.Tensor:
        return self.lora_X @ self.lora_Y - self.init_X @ self.init_Y

    def delta_weight(self) -> torch.Tensor:
        u, vh, r = self.sv_U, self.sv_Vh, self.r
        return (u[:, :r] * self.spectrum_delta()) @ vh[:r] + u[:, r:] @ self.rest_delta() @ vh[r:]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.sv_Vh.dtype) @ self.sv_Vh.T  # coordinates in the right singular basis
        r = self.r
        top = h[..., :r] * self.spectrum_delta()
        low = h[..., r:] @ self.rest_delta().T
        return (top @ self.sv_U[:, :r].T + low @ self.sv_U[:, r:].T).to(x.dtype)


@dataclass
class SaltParams:
    rank: int = 8  # r: top singular values with scale and shift
    lora_rank: int = 8  # q: rank of the update of the remaining singular-value block

    def __post_init__(self) -> None:
        for key in ("rank", "lora_rank"):
            check_positive(f"method.{key}", getattr(self, key))


@ADAPTERS.register("salt")
class SaltAdapter(OwnAdapter):
    Params = SaltParams
    paper = "Elsayed et al., 2025, arXiv:2503.16055"
    size_knob = "lora_rank"  # what a size budget sets (lorabench/budget.py): q, the residual LoRA rank

    def make_layer(self, name: str, linear: nn.Linear, params: SaltParams, ctx: MethodContext) -> SaltLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        return SaltLayer(linear, params.rank, params.lora_rank, seeded_generator(ctx.seed, name))

    def size_limit(self, shapes: list[tuple[int, int]], params: SaltParams) -> int:
        """Budget cap: X Y updates the (k - r) x (k - r) block of the largest target, so q <= k - r."""
        return max(max(min(shape) - params.rank for shape in shapes), 1)

    def layer_trainable(self, d_out: int, d_in: int, params: SaltParams) -> int:
        return 2 * params.rank + 2 * params.lora_rank * (min(d_out, d_in) - params.rank)
