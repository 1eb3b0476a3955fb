"""S2-LoRA's sparsity term (Liu et al., ICASSP 2024, arXiv:2309.11756): an L1 penalty on the per-target
rank coefficients c_l of the ``s2_lora`` adapter (lorabench/methods/adapters/s2_lora.py, whose
docstring has the update rule), so that each weight matrix keeps only a few of the shared ranks:

    loss += lambda * sum_l ||c_l||_1 = lambda * sum_l sum_i |c_l,i|

summed over every S2-LoRA layer, no normalisation; logged as the term ``l1``. Its gradient is
lambda * sign(c_l) (0 at c = 0, torch's subgradient), so it adds nothing at step 0, where every c_l
starts at 0. The shared factors A and B carry no penalty. No authors' code was found; the weight
lambda (``s2_l1_weight``) is ours (see lorabench/method_params/regularizers_s2_lora.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.regularizers_s2_lora import S2LoraL1Params
from lorabench.methods.base import MethodContext, Regularizer
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import REGULARIZERS


def s2_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lorabench.methods.adapters.s2_lora import S2LoraLayer  # here: that module imports this one

    return {name: m for name, m in model.named_modules() if isinstance(m, S2LoraLayer)}


def l1_of_coefficients(layers) -> torch.Tensor:
    """sum_l ||c_l||_1 in float32."""
    return sum(layer.s2_coef.float().abs().sum() for layer in layers)


@REGULARIZERS.register("s2_lora_l1")
class S2LoraL1(Regularizer):
    Params = S2LoraL1Params
    paper = "Liu et al., ICASSP 2024, arXiv:2309.11756"
    backed_by = "lorabench"
    requires_adapter = ("s2_lora",)
    fidelity = Fidelity(
        reference="no released code found; L1 on the rank coefficients as arXiv:2309.11756's abstract states",
        status="rule",
        deviations=("the weight lambda (s2_l1_weight 1e-4) is ours: the paper's value was not available",),
    )

    def setup(self, model: nn.Module, optimizer, params: S2LoraL1Params, ctx: MethodContext) -> None:
        self.params = params
        self.layers = list(s2_layers(model).values())
        if not self.layers:
            from lorabench.errors import ConfigError

            raise ConfigError("regularizer s2_lora_l1 found no s2_lora layer in the model")
        self.last: float | None = None

    def loss_terms(self, model: nn.Module, batch: dict, outputs) -> dict[str, torch.Tensor]:
        term = self.params.s2_l1_weight * l1_of_coefficients(self.layers)
        self.last = float(term.detach())
        return {"l1": term}

    def state(self) -> dict:
        return {
            "weight": self.params.s2_l1_weight,
            "coefficients": sum(layer.s2_coef.numel() for layer in self.layers),
            "last_l1": self.last,
        }
