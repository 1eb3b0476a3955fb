"""S2-LoRA's hyper-parameters (adapter ``s2_lora``, lorabench/methods/adapters/s2_lora.py); torch-free.

Defaults: rank 8 and alpha 8 (s = alpha / r = 1) and N(0, 0.02) for the shared factors, as peft's
AdaLoRA (``lora_alpha`` 8, ``reset_lora_parameters``), the method S2-LoRA starts from; the paper's own
values were not available (no released code). The L1 weight on the coefficients belongs to the
``s2_lora_l1`` regularizer (regularizers_s2_lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_positive
from lorabench.method_params.registry import params_for


@params_for(
    "adapter",
    "s2_lora",
    sharding="shares one A and one B across every layer, and FSDP2 gives each parameter to one unit (one block)",
)
@dataclass
class S2LoraParams:
    rank: int = 8  # r: rows of the shared A, columns of the shared B, length of every c_l
    alpha: float = 8.0  # s = alpha / r (peft AdaLoRA's lora_alpha default)
    s2_init_std: float = 0.02  # std of the shared A and B at init (peft AdaLoRA's P, Q); c starts at 0
    s2_train_shared: bool = True  # false: A and B stay at their random init, only the c_l train

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        check_positive("method.s2_init_std", self.s2_init_std)
