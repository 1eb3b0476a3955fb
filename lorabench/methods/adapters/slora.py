"""SLoRA, Structured LoRA (Guo et al., 2025, "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large
Language Models", arXiv:2502.14482), our own layer.

Update rule: Delta W = s B M A with a small intermediate matrix M (r x r) between LoRA's factors;
B (d_out x r), M and A (r x d_in) all train; s = alpha / r. Init (as the authors' ``slora_init``):
A and M Kaiming uniform (nn.Linear's init), B = 0, so Delta W = 0 at step 0. Trainable parameters
per target: r (d_in + d_out) + r^2, plus the task head.
Hyper-parameters: rank r, alpha (the paper's LLaMA-2-7B runs follow PiSSA's setup; uncertain).

``TriLayer`` (three factors, each trainable or frozen, optionally minus the product of their initial
values so that the model is unchanged at step 0) is shared with NLoRA, IntTune, FLoRA, SoMA/MiLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


class TriLayer(AdapterLayer):
    """y = W0 x + s (B M A - B0 M0 A0) x; ``train`` names the factors that train ("B", "M", "A").
    Frozen factors and the initial copies (B0, M0, A0) are non-persistent buffers: they regenerate
    from W0 or the seed, so the adapter file holds only the trainable factors."""

    def __init__(
        self,
        base: nn.Linear,
        b: torch.Tensor,
        m: torch.Tensor,
        a: torch.Tensor,
        scale: float,
        train: tuple[str, ...] = ("B", "M", "A"),
        subtract_init: bool = False,
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.scale, self.subtract_init = scale, subtract_init
        for key, value in (("B", b), ("M", m), ("A", a)):
            value = value.to(device, dtype).contiguous()
            if key in train:
                setattr(self, f"lora_{key}", nn.Parameter(value.clone()))
            else:
                self.register_buffer(f"lora_{key}", value, persistent=False)
            if subtract_init:
                self.register_buffer(f"init_{key}", value.clone() if key in train else value, persistent=False)

    def _apply_factors(self, x: torch.Tensor, b, m, a) -> torch.Tensor:
        return ((x @ a.T) @ m.T) @ b.T

    def delta_weight(self) -> torch.Tensor:
        w = self.lora_B @ self.lora_M @ self.lora_A
        if self.subtract_init:
            w = w - self.init_B @ self.init_M @ self.init_A
        return self.scale * w

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype)
        out = self._apply_factors(h, self.lora_B, self.lora_M, self.lora_A)
        if self.subtract_init:
            out = out - self._apply_factors(h, self.init_B, self.init_M, self.init_A)
        return (self.scale * out).to(x.dtype)


@dataclass
class SloraParams:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@ADAPTERS.register("slora")
class SloraAdapter(OwnAdapter):
    Params = SloraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Guo et al., 2025, arXiv:2502.14482"

    def make_layer(self, name: str, linear: nn.Linear, params: SloraParams, ctx: MethodContext) -> TriLayer:
        gen, r = seeded_generator(ctx.seed, name), params.rank
        a = kaiming_uniform(r, linear.in_features, gen)
        m = kaiming_uniform(r, r, gen)
        b = torch.zeros(linear.out_features, r)
        return TriLayer(linear, b, m, a, params.alpha / r)

    def layer_trainable(self, d_out: int, d_in: int, params: SloraParams) -> int:
        return params.rank * (d_in + d_out) + params.rank**2
