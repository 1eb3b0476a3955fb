"""The ``alignguard`` regularizer's hyper-parameters (lorabench/methods/regularizers/alignguard.py,
whose docstring has the rule); torch-free.

None of these values comes from the authors: their released code (abhilekhborah/AlignGuard-LoRA@f2143d1a4b00)
implements a different loss and does not even parse, and the paper's text could not be read here. Each
default below says where it comes from: ours, with its reason, or a third party's reading of the paper
(Sirhan1/modelFineTuneRiskAssessment ``AlignGuardConfig``, which cites the paper's Appendix C).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.registry import ZERO_WRITES_WEIGHTS, params_for

DATA_SUFFIXES = (".txt", ".jsonl")  # as analysis.forgetting_data (lorabench/analysis/forgetting.py)


@params_for(
    "regularizer",
    "alignguard",
    requires_adapter=("lora",),
    sharding="projects each whole ΔW = BA onto its Fisher-guided subspace outside the model's forward",
    zero=ZERO_WRITES_WEIGHTS,
)
@dataclass
class AlignGuardParams:
    # lambda_A of lambda_A ||F^{1/2} dW_A||^2. Ours: 0.5 makes the term (1/2) vec(dW_A)^T F vec(dW_A), the
    # second-order estimate of KL(base || tuned) per alignment sequence inside the protected directions
    alignguard_lambda_a: float = 0.5
    # lambda_T of lambda_T ||dW_T||_F^2 (the task part's trust region). Ours: a mild pull on dW_T
    alignguard_lambda_t: float = 0.1
    # lambda_NC of the collision term; the third party's reading
    alignguard_lambda_nc: float = 0.1
    # alpha of alpha E_overlap + (1 - alpha) E_geodesic; the third party's reading (an even blend)
    alignguard_alpha: float = 0.5
    # beta, tau of the overlap weight 1 + beta sigmoid(|dW_ij| - tau); the third party's reading
    alignguard_beta: float = 4.0
    alignguard_tau: float = 0.01
    # k: Fisher eigen-directions protected per target layer. Ours: the estimate from N texts has rank <= N
    alignguard_top_k: int = 8
    # N: alignment texts (decoders) or calibration inputs (encoders) the Fisher is estimated on;
    # as analysis.forgetting_texts' default
    alignguard_samples: int = 32
    # decoders: a local .txt (one text per line) or .jsonl ("text") file of alignment texts; null: N texts
    # sampled from the base model (lorabench/analysis/forgetting.py's sampler). Encoders: must stay null
    alignguard_data: Optional[str] = None
    alignguard_max_length: int = 128  # tokens kept of each text of alignguard_data
    alignguard_batch_size: int = 8  # sequences per forward while estimating the Fisher and the drift

    def __post_init__(self) -> None:
        for name in ("alignguard_lambda_a", "alignguard_lambda_t", "alignguard_lambda_nc", "alignguard_beta"):
            check_positive(f"method.{name}", getattr(self, name), allow_zero=True)
        check_positive("method.alignguard_tau", self.alignguard_tau, allow_zero=True)
        if not 0.0 <= self.alignguard_alpha <= 1.0:  # nan fails both comparisons
            raise ConfigError(f"method.alignguard_alpha={self.alignguard_alpha!r} is invalid; it must be in [0, 1]")
        for name in ("alignguard_top_k", "alignguard_samples", "alignguard_max_length", "alignguard_batch_size"):
            check_positive(f"method.{name}", getattr(self, name))
        if self.alignguard_top_k > self.alignguard_samples:
            raise ConfigError(
                f"method.alignguard_top_k={self.alignguard_top_k} is invalid for method.alignguard_samples="
                f"{self.alignguard_samples}: a Fisher estimated from N samples has at most N eigen-directions, "
                f"so it must be <= {self.alignguard_samples}"
            )
        if self.alignguard_data is not None:
            path = Path(self.alignguard_data)
            if path.suffix not in DATA_SUFFIXES:
                raise ConfigError(
                    f"method.alignguard_data={self.alignguard_data!r} is invalid; "
                    f"valid choices: a {' or '.join(DATA_SUFFIXES)} file, or null (texts sampled from the base model)"
                )
            if not path.is_file():
                raise ConfigError(f"method.alignguard_data={self.alignguard_data!r} does not exist or is not a file")

    def check_adapter(self, adapter) -> None:
        """The split is of dW = s B A: DoRA's update (a rescaled direction) is not that."""
        if getattr(adapter, "use_dora", False):
            raise ConfigError(
                "method.use_dora=true is invalid with method.regularizer='alignguard': the Fisher split is of "
                "the LoRA update dW = s B A, which DoRA's magnitude rescaling changes; set method.use_dora=false"
            )
