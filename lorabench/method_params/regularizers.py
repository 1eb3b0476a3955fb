"""The regularizers' hyper-parameters: one ``Params`` dataclass per regularizer (torch-free).

As in lorabench/method_params/procedures.py: the values each regularizer reads, their defaults (the
authors' where they released code) and the checks that need nothing but the values; the module
lorabench/methods/regularizers/<name>.py sets ``Params = <the class>``. ``needs_outputs`` (a class
attribute) says that the terms read the model's outputs, so the loop runs the model's own forward:
the memory-saving losses (``hardware.labelled_logits``, ``hardware.loss_chunk``) are refused with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorabench.config import check_positive
from lorabench.method_params.registry import ZERO_BETWEEN_BACKWARD_AND_STEP, params_for


@params_for("regularizer", "ba_lora", requires_adapter=("lora",))
@dataclass
class BaLoraParams:
    """cyp-jlu-ai/BA-LoRA ``train.py`` defaults (lambda1, lambda2, lambda3, k)."""

    needs_outputs: ClassVar[str] = "logits"
    consistency_weight: float = 1e-4  # lambda1
    diversity_weight: float = 3e-4  # lambda2
    svd_weight: float = 1e-4  # lambda3
    svd_top_k: int = 3  # k: singular values whose share of the spectrum the SVD term raises

    def __post_init__(self) -> None:
        for name in ("consistency_weight", "diversity_weight", "svd_weight"):
            check_positive(f"method.{name}", getattr(self, name), allow_zero=True)
        check_positive("method.svd_top_k", self.svd_top_k)


@params_for("regularizer", "mgpo", requires_adapter=("lora",), zero=ZERO_BETWEEN_BACKWARD_AND_STEP)
@dataclass
class MgpoParams:
    """llm172/LoRA-MGPO ``lora_mgpo/trainer.py`` defaults (its NLU profile; the NLG profile of its
    ``config.py`` is mgpo_rho 0.01, mgpo_beta 0.8 with AdamW beta1 0.8)."""

    mgpo_rho: float = 0.05  # rho: the perturbation's Frobenius norm per module (before the scale c)
    mgpo_beta: float = 0.9  # EMA coefficient of the gradient-update norm
    mgpo_eps: float = 1e-12
    mgpo_normalize: bool = True  # c = min(1 / (EMA + eps), mgpo_max_scale); false: c = 1
    mgpo_max_scale: float = 10.0  # the reference's clamp of c

    def __post_init__(self) -> None:
        check_positive("method.mgpo_rho", self.mgpo_rho, allow_zero=True)
        check_positive("method.mgpo_eps", self.mgpo_eps)
        check_positive("method.mgpo_max_scale", self.mgpo_max_scale)
        if not 0.0 <= self.mgpo_beta < 1.0:
            from lorabench.errors import ConfigError

            raise ConfigError(f"method.mgpo_beta={self.mgpo_beta!r} is invalid; it must be in [0, 1)")


@params_for(
    "regularizer",
    "pego",
    requires_adapter=("lora",),
    sharding="computes its orthogonality term from whole LoRA factors outside the model's forward",
)
@dataclass
class PegoParams:
    """JudgingH/PEGO ``domainbed/algorithms/algorithms.py`` (``PEGO.update``): ``lora_nums`` LoRAs per
    layer and the weight ``ld`` of the orthogonality loss (1e-3 in the authors' run.sh; their
    config.yaml's default is 0.1)."""

    pego_groups: int = 2  # N: LoRAs per layer, each of rank method.rank / N (run.sh: 2 for PACS, 4 otherwise)
    pego_weight: float = 1e-3  # lambda (``ld``)

    def __post_init__(self) -> None:
        check_positive("method.pego_groups", self.pego_groups)
        check_positive("method.pego_weight", self.pego_weight, allow_zero=True)

    def check_adapter(self, adapter) -> None:
        """The group splits the LoRA's rank: it must be a multiple of ``pego_groups``."""
        rank = getattr(adapter, "rank", None)
        if rank is not None and rank % self.pego_groups:
            from lorabench.errors import ConfigError

            raise ConfigError(
                f"method.rank={rank} is invalid for method.pego_groups={self.pego_groups}: the rank is split "
                f"into {self.pego_groups} LoRAs of equal rank, so it must be a multiple of {self.pego_groups}"
            )


@params_for("regularizer", "gradient_norm_penalty", zero=ZERO_BETWEEN_BACKWARD_AND_STEP)
@dataclass
class GradientNormPenaltyParams:
    """Zhao, Zhang & Hu (ICML 2022, arXiv:2202.03599): L + lambda ||grad L||, by the finite-difference
    gradient (1 - alpha) g(theta) + alpha g(theta + r g / ||g||) with alpha = lambda / r."""

    gnp_alpha: float = 0.8  # alpha = lambda / r; 1 is SAM's gradient, 0 the plain one
    gnp_radius: float = 0.05  # r: the step along the normalised gradient (SAM's rho)

    def __post_init__(self) -> None:
        check_positive("method.gnp_radius", self.gnp_radius)
        if not 0.0 <= self.gnp_alpha <= 1.0:
            from lorabench.errors import ConfigError

            raise ConfigError(f"method.gnp_alpha={self.gnp_alpha!r} is invalid; it must be in [0, 1]")
