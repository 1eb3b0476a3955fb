"""CoDyRA's hyper-parameters (adapter ``codyra``, lorabench/methods/adapters/codyra.py, and procedure
``codyra``, lorabench/methods/procedures/codyra.py); torch-free.

Defaults are the authors' (Artificer-AI-Lab/CoDyRA ``runner_codyra.sh`` and ``main.py``): rank 16,
``--max_kappa 0.005`` (the largest threshold; main.py's argparse default is 7e-4), ``--lambda_num 50``
(the number of values the threshold steps through, 0 to max_kappa) and ``--dense_iters 0.5`` (the share
of the run before any thresholding). The layer has no scale (their ``lora_scaling = 1`` and no alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_positive, check_range
from lorabench.method_params.registry import ZERO_WRITES_WEIGHTS, params_for


@params_for("adapter", "codyra")
@dataclass
class CodyraParams:
    rank: int = 16  # r, the largest rank per target (authors' --rank 16)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)


@params_for("procedure", "codyra", requires_adapter=("codyra",), zero=ZERO_WRITES_WEIGHTS)
@dataclass
class CodyraThresholdParams:
    max_kappa: float = 0.005  # the last threshold of the schedule (authors' --max_kappa, runner_codyra.sh)
    lambda_num: int = 50  # thresholds numpy.linspace(0, max_kappa, lambda_num) (authors' --lambda_num)
    dense_fraction: float = 0.5  # share of train.max_steps before thresholding starts (authors' --dense_iters)

    def __post_init__(self) -> None:
        check_positive("method.max_kappa", self.max_kappa, allow_zero=True)
        check_positive("method.lambda_num", self.lambda_num)
        check_range("method.dense_fraction", self.dense_fraction, 0.0, 1.0)
