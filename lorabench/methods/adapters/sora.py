"""SoRA, Sparse Low-rank Adaptation (Ding et al., 2023, "Sparse Low-rank Adaptation of Pre-trained
Language Models", arXiv:2311.11696), our own layer; checked against the authors' ``LowRankLinear``
(TsinghuaC3I/SoRA ``src/lora.py``) by tests/test_parity_sora_salt_nola.py.

Update rule: Delta W = s B diag(g) A with B (d_out x r_max, zero init), A (r_max x d_in, Kaiming
uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))) and a gate g (r_max, init N(0, 1)),
s = alpha / r_max; forward ((x A^T) * g) B^T * s. A, B and g train with the run's optimizer (AdamW;
g is 1-D so it gets no weight decay, as the authors' separate gate optimizer). The ``sora`` procedure
adds the L1 term on g to the loss and thresholds g after every optimizer step (its docstring has the
rule). ``prune()`` drops the ranks whose gate is 0 and folds g into B, which leaves the layer's
output unchanged. Trainable parameters per target: r_max (d_in + d_out + 1), plus the task head.
Hyper-parameters (authors' GLUE script ``scripts/run_glue_sora_no_schedule.sh``, DeBERTaV3-base):
r_max = 8, lora_alpha 16 (``config/lora_config.json``), lr 8e-4, weight decay 0.1, max_grad_norm 0.1,
warm-up ratio 0.06, ``--sparse_lambda 10`` (the L1 weight) and ``--sparse_lambda_2 3e-4`` (the threshold).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import SoraParams
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


class SoraLayer(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.lora_A = nn.Parameter(kaiming_uniform(r, base.in_features, generator).to(device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.randn(r, generator=generator).to(device, dtype))
        self.scale = alpha / r

    def rank(self) -> int:
        return int(torch.count_nonzero(self.gate).item()) if self.gate is not None else self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        b = self.lora_B if self.gate is None else self.lora_B * self.gate
        return self.scale * b @ self.lora_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype) @ self.lora_A.T
        if self.gate is not None:
            h = h * self.gate
        return ((h @ self.lora_B.T) * self.scale).to(x.dtype)  # the authors' order of operations

    @torch.no_grad()
    def prune(self) -> int:
        """Remove zero-gate ranks and fold g into B; afterwards no gate remains. Returns the rank."""
        if self.gate is None:
            return self.lora_A.shape[0]
        keep = self.gate != 0
        self.lora_A = nn.Parameter(self.lora_A[keep].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(
            (self.lora_B[:, keep] * self.gate[keep]).clone(), requires_grad=self.lora_B.requires_grad
        )
        del self.gate
        self.gate = None
        return int(keep.sum())


def prune_model(model: nn.Module) -> dict[str, int]:
    """``prune()`` every SoRA layer; returns the surviving rank per layer. Build the optimizer anew afterwards."""
    return {name: m.prune() for name, m in model.named_modules() if isinstance(m, SoraLayer)}


@ADAPTERS.register("sora")
class SoraAdapter(OwnAdapter):
    Params = SoraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Ding et al., 2023, arXiv:2311.11696"
    fidelity = Fidelity(
        reference="TsinghuaC3I/SoRA@c275ac237b68 src/lora.py (LowRankLinear)",
        status="parity",
        tolerance="probe outputs and gradients equal before the steps (0 seen), <= 1e-6 + 1e-5 max|ref| after;"
        " max |Δθ| <= 1e-6 over 12 steps (fp32, CPU), with the sora procedure",
        fixture="tests/fixtures/parity/sora.json",
        unchecked=(
            "which non-adapter tensors the authors train (OpenDelta's unfrozen_modules: deltas, layer_norm,"
            " final_layer_norm, not run); lorabench trains the adapter and the task head",
            "the init draws (Kaiming-uniform A, N(0, 1) gate) come from our generator: same distributions;"
            " the parity case sets the same seeded initial values on both sides",
        ),
        revision=2,  # forward multiplies by s last, as the authors' layer (rounding-level change)
    )

    def make_layer(self, name: str, linear: nn.Linear, params: SoraParams, ctx: MethodContext) -> SoraLayer:
        return SoraLayer(linear, params.rank, params.alpha, seeded_generator(ctx.seed, name))

    def layer_trainable(self, d_out: int, d_in: int, params: SoraParams) -> int:
        return params.rank * (d_in + d_out + 1)
