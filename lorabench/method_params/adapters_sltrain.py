"""SLTrain's hyper-parameters (adapter ``sltrain``, lorabench/methods/adapters/sltrain.py); torch-free.

Defaults: rank 8 and alpha 16 (LoRA's preset here: s = alpha / r = 2; the authors pretrain from scratch
with r = 128..1024 and lora_alpha 32..8, s = 1/4..1/128, and have no fine-tuning setting); density
0.03, the authors' pretraining value (``--sp_ratio 0.03`` in their README and every script from 60M to
1B; 0.05 for 7B; the argparse default is 0.01) since they publish no fine-tuning default.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive, check_range
from lorabench.method_params.registry import params_for

# how the sparse values start: zero (the model starts at W0) | uniform (the authors' pretraining
# init U(-1/sqrt(d_in), 1/sqrt(d_in)), so the model starts at W0 + S0)
VALUE_INITS = ("zero", "uniform")


@params_for("adapter", "sltrain")
@dataclass
class SltrainParams:
    rank: int = 8
    alpha: float = 16.0  # s = alpha / r, as the authors' lora_alpha / r
    sltrain_density: float = 0.03  # delta: the share of W's entries in the fixed random support
    sltrain_value_init: str = "zero"

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        check_range("method.sltrain_density", self.sltrain_density, 0.0, 1.0, closed_low=False)
        check_choice("method.sltrain_value_init", self.sltrain_value_init, VALUE_INITS)
