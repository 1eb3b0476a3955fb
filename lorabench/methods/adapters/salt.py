"""SALT (Elsayed et al., 2025, "SALT: Singular Value Adaptation with Low-Rank Transformation",
arXiv:2503.16055; the arXiv id is from memory, not verified), our own layer.

Update rule: SVD W0 = U S V^T. The top-r singular values get a trainable scale and shift,
sigma'_i = a_i sigma_i + b_i (a init 1, b init 0), and the rest of the matrix gets a LoRA-style
low-rank update: Delta W = U_r diag((a - 1) sigma + b) V_r^T + s B A, with B (d_out x q, zero init),
A (q x d_in, Kaiming uniform), s = alpha / q. The model is unchanged at step 0.
Implemented simplification (METHODS.md gives only "LoRA on the residual singular directions"): the
low-rank branch is a plain LoRA pair on the whole input/output space, not constrained to the span of
the residual singular vectors. Trainable parameters per target: 2 r + q (d_in + d_out), plus the
task head. Hyper-parameters: rank r (scaled/shifted singular values), lora_rank q, alpha.
The paper's setting is medical image segmentation (SAM) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, check_rank, seeded_generator, top_svd
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


class SaltLayer(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, q: int, alpha: float, generator: torch.Generator):
        super().__init__(base)
        dtype, device = base.weight.dtype, base.weight.device
        u, s, vh = top_svd(base.weight, r)
        self.register_buffer("sv_U", u.to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("sv_S", s.to(device, dtype), persistent=False)
        self.register_buffer("sv_Vh", vh.to(device, dtype).contiguous(), persistent=False)
        self.sv_scale = nn.Parameter(torch.ones(r, device=device, dtype=dtype))
        self.sv_shift = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.lora_A = nn.Parameter(kaiming_uniform(q, base.in_features, generator).to(device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, q, device=device, dtype=dtype))
        self.scale = alpha / q

    def spectrum_delta(self) -> torch.Tensor:
        return (self.sv_scale - 1) * self.sv_S + self.sv_shift

    def delta_weight(self) -> torch.Tensor:
        return (self.sv_U * self.spectrum_delta()) @ self.sv_Vh + self.scale * self.lora_B @ self.lora_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype)
        top = ((h @ self.sv_Vh.T) * self.spectrum_delta()) @ self.sv_U.T
        low = (h @ self.lora_A.T) @ self.lora_B.T
        return (top + self.scale * low).to(x.dtype)


@dataclass
class SaltParams:
    rank: int = 8  # r: top singular values with scale and shift
    lora_rank: int = 8  # q: rank of the low-rank branch
    alpha: float = 16.0

    def __post_init__(self) -> None:
        for key in ("rank", "lora_rank", "alpha"):
            check_positive(f"method.{key}", getattr(self, key))


@ADAPTERS.register("salt")
class SaltAdapter(OwnAdapter):
    Params = SaltParams
    paper = "Elsayed et al., 2025, arXiv:2503.16055"

    def make_layer(self, name: str, linear: nn.Linear, params: SaltParams, ctx: MethodContext) -> SaltLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        return SaltLayer(linear, params.rank, params.lora_rank, params.alpha, seeded_generator(ctx.seed, name))

    def layer_trainable(self, d_out: int, d_in: int, params: SaltParams) -> int:
        return 2 * params.rank + params.lora_rank * (d_in + d_out)
