"""The ``s2_lora_l1`` regularizer's hyper-parameters (lorabench/methods/regularizers/s2_lora_l1.py);
torch-free. It needs the ``s2_lora`` adapter: the L1 term is on that adapter's per-target rank
coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_positive
from lorabench.method_params.registry import params_for


@params_for("regularizer", "s2_lora_l1", requires_adapter=("s2_lora",))
@dataclass
class S2LoraL1Params:
    # lambda of lambda * sum_l ||c_l||_1; ours: the paper's value was not available (no code, the
    # method section could not be read here), so this is a small weight that leaves c free to leave 0
    s2_l1_weight: float = 1e-4

    def __post_init__(self) -> None:
        check_positive("method.s2_l1_weight", self.s2_l1_weight, allow_zero=True)
