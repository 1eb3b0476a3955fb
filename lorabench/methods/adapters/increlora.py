"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", arXiv:2308.12043), our own layer.

Update rule: AdaLoRA's SVD form Delta W = s P diag(g) Q with P (d_out x r_max), lambda (r_max),
Q (r_max x d_in) and gates g = lambda * m + sg(lambda) * v, where m is the 0/1 mask of active
components, v the 0/1 mask of *reserved* components and sg the stop-gradient. Training starts with
``init_r`` active components per layer; every ``delta_t`` steps the ``increlora`` procedure scores
every module (mean AdaLoRA importance of its active triplets: EMA sensitivity |theta * grad| times
EMA uncertainty) and activates one more component in each of the ``add_per_round`` top-scoring
modules that have room, until the average active rank reaches ``target_r``. The procedure also adds
the orthogonality regulariser's gradient, gamma * d(||P_a^T P_a - I||^2 + ||Q_a Q_a^T - I||^2), on
the active (and reserved) components.
Advance learning (the procedure's ``advance_learn``, on by default as in the authors' code): each
layer with room holds one reserved component whose gate is frozen at ``reserve_gate`` = 1e-5 (so it
takes part in the forward pass and its P column and Q row train before it is activated) and whose
lambda gets no gradient; activation turns the reserve into an active component that keeps its
advance-learned P, Q and starts from lambda = 1e-5, and the next inactive component becomes the
reserve. Source: FeiyuZhang98/IncreLoRA, loralib/loralib/increlora.py (``SVDLinear.add_reserve_param``,
``RankAllocator.update_and_increase`` / ``increase_to_target_rank``); the procedure's docstring has
the full rule and the learning-rate warm-up of new components.
Implementation choices: components are preallocated up to r_max (so the parameter count is fixed:
r_max (d_in + d_out + 1) per target, plus the task head; the active rank is reported by the
procedure and reserved components are not counted in it, as the authors' ``ranknum``); inactive
components get zero gradient (masked), P, Q ~ N(0, 0.02^2) and lambda = 0 as in AdaLoRA (Delta W = 0
at step 0 without the procedure; with advance learning Delta W = s 1e-5 p_r q_r per layer, where r is
the reserve). The scale is s = alpha / r_max (the authors divide by the active rank instead).
The masks are saved buffers (the allocation cannot be regenerated).
Hyper-parameters: rank (r_max per layer), init_r, alpha (s = alpha / r_max); target_r, delta_t,
tinit, add_per_round, ipt_beta1/2 = 0.85, orth_reg_weight = 0.1, advance_learn, reserve_gate,
warmup_new, new_warmup_ratio in the procedure (AdaLoRA-like defaults; the paper's exact values are
not recorded in METHODS.md).
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
        # components reserved for advance learning (frozen gate, trainable P column / Q row); persistent
        self.register_buffer("reserve_mask", torch.zeros(r_max, device=device, dtype=dtype))
        self.scale = alpha / r_max

    def rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def gates(self) -> torch.Tensor:
        """lambda on active components, the frozen lambda (no gradient) on reserved ones, 0 elsewhere."""
        return self.lora_E * self.rank_mask + self.lora_E.detach() * self.reserve_mask

    def reserved(self) -> int | None:
        """Index of the reserved component, or None."""
        idx = self.reserve_mask.nonzero()
        return int(idx[0, 0]) if len(idx) else None

    @torch.no_grad()
    def reserve(self, gate: float) -> int | None:
        """Reserve the first inactive component with its lambda frozen at ``gate`` (advance learning);
        returns its index, or None when the layer has no inactive component left."""
        inactive = ((self.rank_mask == 0) & (self.reserve_mask == 0)).nonzero()
        if len(inactive) == 0:
            return None
        i = int(inactive[0, 0])
        self.reserve_mask[i] = 1
        self.lora_E[i] = gate
        return i

    @torch.no_grad()
    def release(self) -> None:
        """Drop the reserve (budget spent): its lambda is set to 0, so it plays no further part."""
        self.lora_E[self.reserve_mask.bool()] = 0
        self.reserve_mask.zero_()

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_P * self.gates()) @ self.lora_Q

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.to(self.lora_Q.dtype) @ self.lora_Q.T) * self.gates()
        return (self.scale * h @ self.lora_P.T).to(x.dtype)

    @torch.no_grad()
    def grow(self) -> int | None:
        """Activate the reserved component if there is one, else the first inactive one (its lambda
        keeps its value: 1e-5 for an advance-learned reserve, 0 otherwise); returns its index, or
        None when the layer is full."""
        i = self.reserved()
        if i is None:
            inactive = (self.rank_mask == 0).nonzero()
            if len(inactive) == 0:
                return None
            i = int(inactive[0, 0])
        self.reserve_mask[i] = 0
        self.rank_mask[i] = 1
        return i


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
