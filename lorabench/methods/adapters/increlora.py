"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", arXiv:2308.12043), our own layer.

Update rule: AdaLoRA's SVD form Delta W = s P diag(lambda * m) Q with P (d_out x r_max),
lambda (r_max), Q (r_max x d_in) and a 0/1 mask m of active components. Training starts with
``init_r`` active components per layer; every ``delta_t`` steps the ``increlora`` procedure scores
every module (mean AdaLoRA importance of its active triplets: EMA sensitivity |theta * grad| times
EMA uncertainty) and activates one more component in each of the ``add_per_round`` top-scoring
modules that have room, until the average active rank reaches ``target_r``. The procedure also adds
the orthogonality regulariser's gradient, gamma * d(||P_a^T P_a - I||^2 + ||Q_a Q_a^T - I||^2), on
the active components.
Implementation choices: components are preallocated up to r_max (so the parameter count is fixed:
r_max (d_in + d_out + 1) per target, plus the task head; the active rank is reported by the
procedure); inactive components get zero gradient (masked), P, Q ~ N(0, 0.02^2) and lambda = 0 as in
AdaLoRA (Delta W = 0 at step 0). Not implemented: the paper's "advance learning" warm start of new
components and their separate learning-rate warm-up (new components start from their init).
The mask is a saved buffer (the allocation cannot be regenerated).
Hyper-parameters: rank (r_max per layer), init_r, alpha (s = alpha / r_max); target_r, delta_t,
tinit, add_per_round, ipt_beta1/2 = 0.85, orth_reg_weight = 0.1 in the procedure (AdaLoRA-like
defaults; the paper's exact values are not recorded in METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


class IncreLoraLayer(AdapterLayer):
    def __init__(self, base: nn.Linear, r_max: int, init_r: int, alpha: float, generator: torch.Generator):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.lora_P = nn.Parameter(
            (torch.randn(base.out_features, r_max, generator=generator) * 0.02).to(device, dtype)
        )
        self.lora_E = nn.Parameter(torch.zeros(r_max, device=device, dtype=dtype))
        self.lora_Q = nn.Parameter((torch.randn(r_max, base.in_features, generator=generator) * 0.02).to(device, dtype))
        mask = torch.zeros(r_max, device=device, dtype=dtype)
        mask[:init_r] = 1
        self.register_buffer("rank_mask", mask)  # persistent: the allocation is saved with the adapter
        self.scale = alpha / r_max

    def rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def gates(self) -> torch.Tensor:
        return self.lora_E * self.rank_mask

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_P * self.gates()) @ self.lora_Q

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.to(self.lora_Q.dtype) @ self.lora_Q.T) * self.gates()
        return (self.scale * h @ self.lora_P.T).to(x.dtype)

    @torch.no_grad()
    def grow(self) -> bool:
        """Activate the next inactive component; False when the layer is full."""
        inactive = (self.rank_mask == 0).nonzero()
        if len(inactive) == 0:
            return False
        self.rank_mask[inactive[0, 0]] = 1
        return True


@dataclass
class IncreLoraParams:
    rank: int = 12  # r_max per layer (preallocated)
    init_r: int = 2  # active components per layer at the start
    alpha: float = 12.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if not 0 <= self.init_r <= self.rank:
            raise ConfigError(f"method.init_r={self.init_r!r} is invalid; it must be in [0, method.rank={self.rank}]")


@ADAPTERS.register("increlora")
class IncreLoraAdapter(OwnAdapter):
    Params = IncreLoraParams
    paper = "Zhang et al., 2023, arXiv:2308.12043"

    def make_layer(self, name: str, linear: nn.Linear, params: IncreLoraParams, ctx: MethodContext) -> IncreLoraLayer:
        return IncreLoraLayer(linear, params.rank, params.init_r, params.alpha, seeded_generator(ctx.seed, name))

    def layer_trainable(self, d_out: int, d_in: int, params: IncreLoraParams) -> int:
        return params.rank * (d_in + d_out + 1)
