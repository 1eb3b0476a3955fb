"""PEGO's orthogonal regularization of a group of LoRAs (Hu et al., ECCV 2024, "Learn to Preserve and
Diversify: Parameter-Efficient Group with Orthogonal Regularization for Domain Generalization"), as
the authors' DomainBed code computes it (JudgingH/PEGO ``domainbed/algorithms/algorithms.py``,
``PEGO.update``; the group in ``domainbed/networks/lora.py``).

Every targeted layer with frozen weight W carries N LoRAs, Delta W_i = s B_i A_i (i = 1..N). Here they
are one peft LoRA of rank N r whose factors split into N blocks, A = [A_1; ...; A_N] (rows) and
B = [B_1, ..., B_N] (columns), so sum_i Delta W_i = s B A; each member starts as the reference's
does (A kaiming-uniform, B zero: peft's default), and the reference's unscaled sum is s = 1, i.e.
alpha = rank. With |M|_1 the sum of absolute entries, the loss adds

    lambda * sum_layers ( sum_i |W Delta W_i^T|_1  +  sum_{i<j} |Delta W_i Delta W_j^T|_1 )

"preserve" (each member's rows orthogonal to the pretrained rows) and "diversify" (the members'
rows orthogonal to each other); sums everywhere, no normalisation. Both are 0 at the start (B = 0).

What the text version keeps: the paper adapts a ViT's fused qkv projection for image domain
generalization on DomainBed; here the group sits on the model's query and value projections
(``target_modules: default``, the same q and v) of a text model, and the regularizer is unchanged.
Not kept: DomainBed's data pipeline and its fp16 CLIP weights (the terms run in fp32 here).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.regularizers import PegoParams
from lorabench.methods.base import MethodContext, Regularizer
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.regularizers.mgpo import lora_layers
from lorabench.registry import REGULARIZERS

REFERENCE = "JudgingH/PEGO@fb8700b4b92b"


def group_terms(weight, a, b, groups: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(preserve, diversify) of one layer: W (d_out x d_in), A (N r x d_in), B (d_out x N r)."""
    weight, a, b = weight.float(), a.float(), b.float()
    a_parts, b_parts = a.chunk(groups, dim=0), b.chunk(groups, dim=1)
    preserve = sum(((weight @ a_i.T) @ b_i.T).abs().sum() for a_i, b_i in zip(a_parts, b_parts)) * scaling
    diversify = weight.new_zeros(())
    for i in range(groups):
        for j in range(i + 1, groups):
            product = b_parts[i] @ (a_parts[i] @ a_parts[j].T) @ b_parts[j].T
            diversify = diversify + product.abs().sum() * scaling**2
    return preserve, diversify


@REGULARIZERS.register("pego")
class Pego(Regularizer):
    Params = PegoParams
    paper = "ECCV 2024 (Hu et al.), code JudgingH/PEGO"
    backed_by = "lorabench"
    requires_adapter = ("lora",)
    fidelity = Fidelity(
        reference=f"{REFERENCE} domainbed/algorithms/algorithms.py (PEGO.update: loss_o)",
        status="parity",
        tolerance="loss and every factor's gradient <= 1e-5 relative (fp32), 2 layers x q, v x 3 LoRAs",
        fixture="tests/fixtures/parity/pego.json",
        deviations=(
            "the group is one peft LoRA of rank N r split into N blocks (the same sum and the same loss); "
            "the reference keeps N separate modules",
        ),
        unchecked=("the reference's fp16 training of the ViT (its terms are computed in fp16 there)",),
    )

    def setup(self, model: nn.Module, optimizer, params: PegoParams, ctx: MethodContext) -> None:
        self.params = params
        self.layers = lora_layers(model)
        self.last: dict[str, float] = {}

    def loss_terms(self, model: nn.Module, batch: dict, outputs) -> dict[str, torch.Tensor]:
        preserve, diversify = 0.0, 0.0
        for layer in self.layers.values():
            name = layer.active_adapters[0]
            p, d = group_terms(
                layer.get_base_layer().weight.detach(),
                layer.lora_A[name].weight,
                layer.lora_B[name].weight,
                self.params.pego_groups,
                float(layer.scaling[name]),
            )
            preserve, diversify = preserve + p, diversify + d
        weight = self.params.pego_weight
        terms = {"preserve": weight * preserve, "diversify": weight * diversify}
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        return terms

    def state(self) -> dict:
        return {"groups": self.params.pego_groups, "weight": self.params.pego_weight, "last_terms": self.last}
