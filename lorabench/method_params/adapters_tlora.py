"""TLoRA's hyper-parameters (adapter ``tlora``, lorabench/methods/adapters/tlora.py); torch-free.

Defaults: the paper's TLoRA(2,6) (Tao et al., 2025, Table of controllable generation, 0.40M parameters on
SD 1.5): a tensor-ring-matrix transform of ring rank 2 and a tensor-ring residual of rank 6, each width
split into 3 tensor modes (the authors' table of SD widths has 3 modes throughout); alpha 1.0 with the
authors' rsLoRA-style scale s = alpha / sqrt(rank) on the residual (their ``use_rslora=True``, always
on in their scripts, ``--alpha`` default 1.0). The authors' subject-driven script runs a Kronecker
transform with a rank-1 LoRA residual: ``tlora_transform_rank=1 tlora_residual=lora rank=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.registry import params_for

# the residual Delta: tr (tensor ring over the output and input modes, the paper's) | lora (B A, as the
# authors' subject-driven script runs it)
RESIDUALS = ("tr", "lora")


def _check_int(where: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}={value!r} is invalid; it must be an integer >= {low}")


@params_for("adapter", "tlora")
@dataclass
class TloraParams:
    rank: int = 6  # the residual's rank: tensor-ring rank (tr) or LoRA rank (lora); the size knob
    alpha: float = 1.0  # residual scale s = alpha / sqrt(rank)
    tlora_transform_rank: int = 2  # ring rank of the transform T (1: Kronecker factors; 0: no transform)
    tlora_residual: str = "tr"
    tlora_modes: int = 3  # D: tensor modes each of d_in and d_out is split into

    def __post_init__(self) -> None:
        _check_int("method.rank", self.rank, 1)
        check_positive("method.alpha", self.alpha)
        _check_int("method.tlora_transform_rank", self.tlora_transform_rank, 0)
        check_choice("method.tlora_residual", self.tlora_residual, RESIDUALS)
        _check_int("method.tlora_modes", self.tlora_modes, 1)
        if self.tlora_modes > 8:
            raise ConfigError(f"method.tlora_modes={self.tlora_modes!r} is invalid; it must be in 1..8")
