"""SLoRA, Structured LoRA (Guo et al., 2025, "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large
Language Models", arXiv:2502.14482), our own layer.

Update rule: Delta W = s B M A with a small intermediate matrix M (r x r) between LoRA's factors;
B (d_out x r), M and A (r x d_in) all train; s = alpha / r. Init (as the authors' ``slora_init``):
A and M Kaiming uniform with a = sqrt(5) (nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
B = 0, so Delta W = 0 at step 0. Trainable parameters per target: r (d_in + d_out) + r^2, plus the
task head. Hyper-parameters: rank r, alpha (the authors' scripts set lora_alpha = lora_rank, s = 1:
8/8 in their argument defaults, 128/128 in their runs; the preset's ``alpha: ${.rank}``).
Deviation kept: A and M are drawn from a generator seeded by the run seed and the layer name (the
authors draw from torch's global generator); the distribution is the same.

``TriLayer`` (three factors, each trainable or frozen, the initial product optionally subtracted or
kept as a frozen part) is shared with NLoRA, IntTune, FLoRA, SoMA/MiLoRA and LaMDA.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import SloraParams
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

NLORA_REPO = "TracyGuo2001/NLoRA@b66f88d7f94d"  # its peft fork: peft/src/peft/tuners/lora/layer.py


class TriLayer(AdapterLayer):
    """Three factors B (d_out x r), M (r x r), A (r x d_in) on a frozen W0; ``train`` names the factors
    that train ("B", "M", "A"). What the initial product P = s B0 M0 A0 (the factors' values at
    construction) does:

    * plain (default): y = W0 x + s B M A x (inits whose product starts at 0: SLoRA, FLoRA);
    * ``subtract_init``: y = W0 x + s (B M A - B0 M0 A0) x, the model is unchanged at step 0 and W0
      is never modified (SoMA/MiLoRA, LaMDA);
    * ``keep_init``: y = W0 x + s B M A x with P kept as a frozen part of the layer (NLoRA, IntTune:
      the model starts at W0 + P, as the authors' init leaves W0 untouched).

    Under autocast (bf16/fp16 matmuls) the trained difference D = s (B M A - B0 M0 A0) is never
    formed as the difference of two rounded products (the cancellation would leave mostly rounding
    noise, and updates below one half-precision step of a factor would vanish): it is expanded as
    D x = s [(B - B0) M A x + B0 (M - M0) A x + B0 M0 (A - A0) x], each factor difference taken in
    float32, each term carrying the rounding of its own size only, and the terms summed in float32;
    ``keep_init`` adds the frozen P x as one more term. Without autocast the factors are applied
    directly in the adapter dtype (float32 rounding is far below any update). Frozen factors and the
    initial copies (B0, M0, A0) are non-persistent buffers: they regenerate from W0 or the seed, so
    the adapter file holds only the trainable factors."""

    def __init__(
        self,
        base: nn.Linear,
        b: torch.Tensor,
        m: torch.Tensor,
        a: torch.Tensor,
        scale: float,
        train: tuple[str, ...] = ("B", "M", "A"),
        subtract_init: bool = False,
        keep_init: bool = False,
    ):
        super().__init__(base)
        if subtract_init and keep_init:
            raise ValueError("TriLayer: subtract_init and keep_init exclude each other")
        dtype, device = self.adapter_dtype, base.weight.device
        self.scale, self.subtract_init, self.keep_init = scale, subtract_init, keep_init
        self.trained = tuple(key for key in "BMA" if key in train)
        for key, value in (("B", b), ("M", m), ("A", a)):
            value = value.to(device, dtype).contiguous()
            if key in train:
                setattr(self, f"lora_{key}", nn.Parameter(value.clone()))
            else:
                self.register_buffer(f"lora_{key}", value, persistent=False)
            if subtract_init or keep_init:
                self.register_buffer(f"init_{key}", value.clone() if key in train else value, persistent=False)

    @property
    def tracks_init(self) -> bool:
        return self.subtract_init or self.keep_init

    def _apply_factors(self, x: torch.Tensor, b, m, a) -> torch.Tensor:
        return ((x @ a.T) @ m.T) @ b.T

    def _difference_terms(self, h: torch.Tensor) -> list[torch.Tensor]:
        """The terms of (B M A - B0 M0 A0) h, one per trained factor (a frozen factor equals its copy)."""
        b, m, a = self.lora_B, self.lora_M, self.lora_A
        b0, m0, a0 = self.init_B, self.init_M, self.init_A
        ah = h @ a.T
        terms = []
        if "B" in self.trained:
            terms.append((ah @ m.T) @ (b - b0).T)
        inner = []
        if "M" in self.trained:
            inner.append(ah @ (m - m0).T)
        if "A" in self.trained:
            inner.append((h @ (a - a0).T) @ m0.T)
        terms += [t @ b0.T for t in inner]
        return terms

    def delta_weight(self) -> torch.Tensor:
        """W - W0 in the adapter dtype (autocast off); ``subtract_init`` expands it as the forward does."""
        b, m, a = self.lora_B, self.lora_M, self.lora_A
        with torch.autocast(b.device.type, enabled=False):
            if not self.subtract_init:
                return self.scale * (b @ m @ a)
            b0, m0, a0 = self.init_B, self.init_M, self.init_A
            return self.scale * ((b - b0) @ m @ a + b0 @ (m - m0) @ a + b0 @ m0 @ (a - a0))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype)
        if self.tracks_init and torch.is_autocast_enabled(h.device.type):
            terms = self._difference_terms(h)
            if self.keep_init:
                terms.append(self._apply_factors(h, self.init_B, self.init_M, self.init_A))
            out = torch.zeros((), dtype=self.lora_A.dtype, device=h.device)
            for term in terms:
                out = out + term.to(self.lora_A.dtype)
        else:
            out = self._apply_factors(h, self.lora_B, self.lora_M, self.lora_A)
            if self.subtract_init:
                out = out - self._apply_factors(h, self.init_B, self.init_M, self.init_A)
        return (self.scale * out).to(x.dtype)


@ADAPTERS.register("slora")
class SloraAdapter(OwnAdapter):
    Params = SloraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Guo et al., 2025, arXiv:2502.14482"
    fidelity = Fidelity(
        reference=f"{NLORA_REPO} (Linear with init_lora_weights='s_lora')",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 AdamW steps (fp32, CPU); init rule: B = 0, A and M in the bounds",
        fixture="tests/fixtures/parity/nlora.json",
        deviations=(
            "A and M are drawn from a generator seeded by the run seed and the layer name, not torch's global"
            " generator: same distribution, other values (the trajectory is compared from the reference's values)",
        ),
        unchecked=(
            "lora_dropout > 0: the fork drops out x before A, TriLayer has no dropout (the authors' scripts use 0)",
        ),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: SloraParams, ctx: MethodContext) -> TriLayer:
        gen, r = seeded_generator(ctx.seed, name), params.rank
        a = kaiming_uniform(r, linear.in_features, gen)
        m = kaiming_uniform(r, r, gen)
        b = torch.zeros(linear.out_features, r)
        return TriLayer(linear, b, m, a, params.alpha / r)

    def layer_trainable(self, d_out: int, d_in: int, params: SloraParams) -> int:
        return params.rank * (d_in + d_out) + params.rank**2
