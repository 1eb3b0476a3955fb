"""NLoRA, Nystrom-initiated LoRA (Guo et al., 2025, "NLoRA: Nystrom-Initiated Low-Rank Adaptation for
Large Language Models", arXiv:2502.14482), our own layer (SLoRA's three factors, slora.TriLayer).

Init (as the authors' ``nlora_init``, TracyGuo2001/NLoRA@b66f88d7f94d peft fork): with the index
sets I = J = {the first r rows / columns} of W0 (d_out x d_in), B0 = W0[:, J] (d_out x r),
M0 = W0[I, J] (r x r, copied: no pseudo-inverse and no division by s) and A0 = W0[I, :] (r x d_in).
W0 itself is left untouched, so the model starts at W0 + s B0 M0 A0 (not at W0).
Update rule: W = W0 + s B M A with B, M, A all trainable, s = alpha / r; Delta W = s B M A.
The paper writes the Nystrom core as the pseudo-inverse W0[I, J]^+, the released code copies
W0[I, J]; the code is followed here (on SmolLM2's q/v weights W0[:8, :8] has a median condition
number of ~49, and C W_IJ^+ R approximates W0 worse than zero).
Trainable parameters per target: r (d_in + d_out) + r^2, plus the task head.
Hyper-parameters: rank r, alpha (the authors' scripts set lora_alpha = lora_rank, s = 1: 8/8 in
their argument defaults, 128/128 in their runs; the preset's ``alpha: ${.rank}``).
Deviation kept: GPT-2 ``Conv1D`` targets are sliced in their (d_out x d_in) view; the fork slices the
stored (d_in x d_out) weight, which only fits square weights.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import NloraParams
from lorabench.methods.adapters.layer import OwnAdapter, check_rank
from lorabench.methods.adapters.slora import NLORA_REPO, TriLayer
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

NLORA_FIXTURE = "tests/fixtures/parity/nlora.json"
NLORA_TOLERANCE = "max |Δθ| <= 1e-6 over 12 AdamW steps (fp32, CPU); init factors, step-0 output and gradients"


def nystrom_slices(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B0, M0, A0) = (W[:, :r], W[:r, :r], W[:r, :]) in float32: the authors' Nystrom init."""
    w = w.detach().float()
    return w[:, :r].clone(), w[:r, :r].clone(), w[:r, :].clone()


@ADAPTERS.register("nlora")
class NloraAdapter(OwnAdapter):
    Params = NloraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Guo et al., 2025, arXiv:2502.14482"
    train = ("B", "M", "A")
    fidelity = Fidelity(
        reference=f"{NLORA_REPO} (Linear with init_lora_weights='n_lora')",
        status="parity",
        tolerance=NLORA_TOLERANCE,
        fixture=NLORA_FIXTURE,
        deviations=(
            "under autocast the trained part s (B M A - B0 M0 A0) x is expanded factor by factor and the frozen"
            " s B0 M0 A0 x added as its own term (the fork rounds B, M, A to bf16 and multiplies them): equal in"
            " exact arithmetic, exact to bf16 rounding of each term",
            "Conv1D (GPT-2) targets are sliced in their (d_out x d_in) view; the fork's slicing fits square ones only",
        ),
        unchecked=(
            "lora_dropout > 0: the fork drops out x before A, TriLayer has no dropout (the authors' scripts use 0)",
        ),
        revision=2,
    )

    def make_layer(self, name: str, linear: nn.Linear, params: NloraParams, ctx: MethodContext) -> TriLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        b, m, a = nystrom_slices(linear.weight, params.rank)
        return TriLayer(linear, b, m, a, params.alpha / params.rank, train=self.train, keep_init=True)

    def layer_trainable(self, d_out: int, d_in: int, params: NloraParams) -> int:
        return params.rank * (d_in + d_out) + params.rank**2
