"""CoDyRA, Continual Dynamic Rank-Selective LoRA (Lu, Zhao, Xue, Yao, Moore & Gong, 2024, "Adaptive
Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with Dynamic
Rank-Selective LoRA", arXiv:2412.01004), our own layer; checked against the authors' ``codyra_Linear``
(Artificer-AI-Lab/CoDyRA ``loralib/codyra.py``) by tests/test_parity_codyra.py.

Update rule, on a frozen pretrained W0 (d_out x d_in, bias b0):
    h = W0 x + b0 + B diag(g) A x,    Delta W = B diag(g) A,
with A (r x d_in, Kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), B (d_out x r,
zero) and a per-rank importance gate g (r, N(0, 1)), all three trained by the run's AdamW. No scale: the
authors' layer keeps ``lora_scaling = 1`` and never applies an alpha. Forward ((x A^T) * g) B^T, the
authors' order. Delta W = 0 at step 0 (B = 0). The ``codyra`` procedure makes g sparse (a threshold after
every optimizer step, its docstring has the schedule); a rank whose gate is 0 adds nothing, so the
trained adapter has rank ``active_rank()`` <= r per module. Trainable parameters per target:
r (d_in + d_out + 1), plus the task head.

Setting: the paper fine-tunes CLIP ViT-B/16 (both encoders' attention q, k, v, out and MLP c_fc, c_proj)
on a sequence of image-classification tasks; after each task, ``increment_task`` drops the zero-gate
ranks, merges B diag(g) A into the frozen weight and starts a fresh adapter for the next task. Here the
layer wraps a text transformer's linear modules (``target_modules``: the model's list by default; the
authors' choice of every attention and MLP projection is ``all-linear``) for one fine-tuning run; the
task sequence and its merge belong to a continual protocol and are left out, as are CLIP's image-text
contrastive loss and its few-shot data. ``merge()`` folds B diag(g) A into W0 as their merge does.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters_codyra import CodyraParams
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

CODYRA_REPO = "Artificer-AI-Lab/CoDyRA@c1691e4c4c8a"


class CodyraLayer(AdapterLayer):
    """y = W0 x + b0 + ((x A^T) * g) B^T."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        r = a.shape[0]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r) or gate.shape != (r,):
            raise ValueError(
                f"CoDyRA factors A {tuple(a.shape)}, B {tuple(b.shape)}, gate {tuple(gate.shape)} do not fit"
                f" a {base.out_features} x {base.in_features} layer at rank {r}"
            )
        self.lora_A = nn.Parameter(a.to(device, dtype).clone())
        self.lora_B = nn.Parameter(b.to(device, dtype).clone())
        self.gate = nn.Parameter(gate.to(device, dtype).clone())

    def active_rank(self) -> int:
        """The ranks whose gate is not 0 (the authors' ``torch.count_nonzero(gate)``)."""
        return int(torch.count_nonzero(self.gate).item())

    def delta_weight(self) -> torch.Tensor:
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return (self.lora_B * self.gate) @ self.lora_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype)
        return (((h @ self.lora_A.T) * self.gate) @ self.lora_B.T).to(x.dtype)


@ADAPTERS.register("codyra")
class CodyraAdapter(OwnAdapter):
    Params = CodyraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Lu et al., 2024, arXiv:2412.01004"
    fidelity = Fidelity(
        reference=f"{CODYRA_REPO} loralib/codyra.py (codyra_Linear)",
        status="parity",
        tolerance="max |Δ| <= 1e-6 of the first step's outputs and gradients, the final A, B, g, the probe"
        " outputs and the weight after merge() against their increment_task merge; float64 checksums within"
        " 1e-5 at every step (fp32, CPU; 12 to 100 AdamW steps with the codyra procedure; 0 seen at the"
        " fixture's 12 digits); the same gates exactly 0",
        fixture="tests/fixtures/parity/codyra.json",
        deviations=(
            "single run on text linears: the continual increment_task (drop zero-gate ranks, merge into W0,"
            " restart the adapter for the next task) is a protocol's business and is left out",
            "g is a 1-D tensor of r entries (the authors' is 1 x r): with weight decay > 0 lorabench's AdamW"
            " groups leave it undecayed while the authors' single AdamW would decay it; they train with"
            " weight decay 0 (main.py --wd default, not set by runner_codyra.sh)",
            "A and g are drawn from a generator seeded by the run seed and the layer name, not torch's global"
            " generator (same distributions: Kaiming uniform a = sqrt(5), N(0, 1)); the parity case loads"
            " the reference's draws",
            "targets: the model's default list unless target_modules says otherwise; the authors adapt every"
            " attention and MLP projection of both CLIP encoders (qkvoinout, target_encoder all)",
        ),
        unchecked=(
            "lora_dropout: accepted by their layer with default 0 and never set by their code, so absent here",
            "fan_in_fan_out (their GPT-2-style transposed weights) is not compared; lorabench views a Conv1D"
            " as an nn.Linear before wrapping",
            "their bf16/AMP behaviour (they train in fp32); ours is checked by tests/test_bf16_safety.py",
        ),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: CodyraParams, ctx: MethodContext) -> CodyraLayer:
        d_out, d_in, r = linear.out_features, linear.in_features, params.rank
        gen = seeded_generator(ctx.seed, name)
        a = kaiming_uniform(r, d_in, gen)
        gate = torch.randn(r, generator=gen)
        return CodyraLayer(linear, a, torch.zeros(d_out, r), gate)

    def layer_trainable(self, d_out: int, d_in: int, params: CodyraParams) -> int:
        return params.rank * (d_in + d_out + 1)
