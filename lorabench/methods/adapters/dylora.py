"""DyLoRA (Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation", arXiv:2210.07558), our own layer.

Update rule: a LoRA pair B (d_out x r_max, zero init), A (r_max x d_in, Kaiming-uniform init). At
each training step a rank b ~ U{r_min..r_max} is drawn (the ``dylora`` procedure, one b for the
whole model per step) and the forward uses only the first b ranks:
Delta W_b = (alpha / b) B[:, :b] A[:b, :]. In eval mode the layer uses ``eval_rank`` (0 = r_max), so
one trained adapter can be served at any rank <= r_max. Trainable parameters per target:
r_max * (d_in + d_out), plus the task head.
Hyper-parameters: rank (r_max; the authors' GLUE scripts: 8), r_min (1), alpha (their scripts: 16),
eval_rank. The procedure's ``frozen`` flag (default true, as the authors' scripts) is the paper's
"frozen" mode: only row/column b receives gradient; with false all ranks <= b do.
The authors' layer scales each truncated factor by sqrt(r_max / b) around LoRA's alpha / r_max, the
same alpha / b on the product. Without the ``dylora`` procedure the layer trains at r_max (plain LoRA
with scale alpha / r_max).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.method_params.adapters import DyLoraParams
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (Kaiming uniform with a = sqrt(5)): U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


class DyLoraLayer(AdapterLayer):
    def __init__(
        self, base: nn.Linear, r_max: int, r_min: int, alpha: float, eval_rank: int, generator: torch.Generator
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.lora_A = nn.Parameter(kaiming_uniform(r_max, base.in_features, generator).to(device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r_max, device=device, dtype=dtype))
        self.r_max, self.r_min, self.alpha = r_max, r_min, alpha
        self.eval_rank = eval_rank or r_max
        self.train_rank = r_max  # set each step by the dylora procedure

    def active_rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        b = rank or self.active_rank()
        return (self.alpha / b) * self.lora_B[:, :b] @ self.lora_A[:b, :]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.active_rank()
        h = x.to(self.lora_A.dtype) @ self.lora_A[:b, :].T
        return ((self.alpha / b) * h @ self.lora_B[:, :b].T).to(x.dtype)


@ADAPTERS.register("dylora")
class DyLoraAdapter(OwnAdapter):
    Params = DyLoraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Valipour et al., 2023, arXiv:2210.07558"
    fidelity = Fidelity(
        reference="huawei-noah/Efficient-NLP@bb44348bc897 DyLoRA/loralib (layers.py Linear, DyLoRA.py dynamic)",
        status="parity",
        tolerance="max |Δ| / max(1, |ref|) <= 1e-6 of outputs, gradients, A and B over 12 steps (fp32, CPU), and of"
        " the outputs at every rank after training",
        fixture="tests/fixtures/parity/dylora.json",
        deviations=(
            "A's Kaiming-uniform init is drawn from a generator seeded by the run seed and the layer name, not"
            " torch's global generator (same distribution; the parity test loads the reference's draw)",
        ),
        unchecked=("loralib's merge-on-eval path (merge_weights) is not exercised; ours merges on request only",),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: DyLoraParams, ctx: MethodContext) -> DyLoraLayer:
        return DyLoraLayer(
            linear, params.rank, params.r_min, params.alpha, params.eval_rank, seeded_generator(ctx.seed, name)
        )

    def layer_trainable(self, d_out: int, d_in: int, params: DyLoraParams) -> int:
        return params.rank * (d_in + d_out)
