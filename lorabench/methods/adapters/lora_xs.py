"""LoRA-XS (Balazy et al., 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
Parameters", arXiv:2405.17604), our own layer.

Update rule: Delta W = s * B R A with B = U_r (d_out x r) and A = Sigma_r V_r^T (r x d_in) from the
truncated SVD of the pretrained W0 (the authors' ``get_svd_replacement_module``, which puts the
singular values on the input side), both frozen; only the r x r matrix R trains, s = alpha / r.
Trainable parameters per target: r^2 (independent of the width), plus the task head.
Hyper-parameters: rank r (paper sweeps 4..25 on GLUE), alpha (scale s = alpha / r; the paper keeps
alpha fixed and tunes lr, typically 10x LoRA's), r_init_std.
Implemented detail: the authors draw R from N(0, 1e-5^2); here R starts at 0 by default
(``r_init_std: 0.0``) so that the model is unchanged at step 0 (the gradient of R, s B^T G A^T, is
non-zero because B and A are); ``r_init_std: 1.0e-5`` reproduces the authors' init. B and A
regenerate from W0 and are not saved (non-persistent buffers).

``XsLayer`` is shared with LoRA-SB (lora_sb.py), which initialises B, A and R from gradients and
keeps R's initial value R0 as a saved buffer: Delta W = s B (R - R0) A.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import LoraXsParams
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, check_rank, seeded_generator, top_svd
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


class XsLayer(AdapterLayer):
    """y = W0 x + s B (R - R0) A x with frozen B, A (and R0, absent when R starts at 0)."""

    def __init__(
        self,
        base: nn.Linear,
        b: torch.Tensor,
        a: torch.Tensor,
        r: torch.Tensor,
        scale: float,
        r0: torch.Tensor | None = None,
        persistent_factors: bool = False,
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.register_buffer("lora_B", b.to(device, dtype).contiguous(), persistent=persistent_factors)
        self.register_buffer("lora_A", a.to(device, dtype).contiguous(), persistent=persistent_factors)
        self.lora_R = nn.Parameter(r.to(device, dtype).clone())
        if r0 is not None:
            self.register_buffer("lora_R0", r0.to(device, dtype).clone())
        else:
            self.lora_R0 = None
        self.scale = scale

    def core(self) -> torch.Tensor:
        return self.lora_R if self.lora_R0 is None else self.lora_R - self.lora_R0

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.core() @ self.lora_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype) @ self.lora_A.T
        return (self.scale * (h @ self.core().T) @ self.lora_B.T).to(x.dtype)


@ADAPTERS.register("lora_xs")
class LoraXsAdapter(OwnAdapter):
    Params = LoraXsParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Balazy et al., 2024, arXiv:2405.17604"

    def make_layer(self, name: str, linear: nn.Linear, params: LoraXsParams, ctx: MethodContext) -> XsLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        u, s, vh = top_svd(linear.weight, params.rank)
        r = torch.zeros(params.rank, params.rank)
        if params.r_init_std > 0:
            r = torch.randn(params.rank, params.rank, generator=seeded_generator(ctx.seed, name)) * params.r_init_std
        return XsLayer(linear, u, s[:, None] * vh, r, params.alpha / params.rank)

    def layer_trainable(self, d_out: int, d_in: int, params: LoraXsParams) -> int:
        return params.rank * params.rank
