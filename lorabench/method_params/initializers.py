"""The initializers' hyper-parameters: one ``Params`` dataclass per initializer (torch-free).

As in lorabench/method_params/adapters.py: the values each initializer reads, their defaults and
the checks that need nothing but the values; the initializer module sets ``Params = <the class>``.
Every initializer here works on the LoRA adapter only (``requires_adapter=("lora",)``).

One check stays with the initializer: QLoRA's and LoftQ's need for CUDA and bitsandbytes asks torch,
so ``Nf4Init.check_backend`` / ``LoftqInit.check_backend`` run it when the method is resolved
(``lorabench.methods.spec.resolve_method``), still before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.registry import NoParams, params_for

# lora_ga
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
# nf4: the compute dtypes bitsandbytes' 4-bit layers accept, by torch name
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@params_for("init", "corda", requires_adapter=("lora",))
@dataclass
class CordaParams:
    corda_method: str = "ipm"
    rank: int = 8  # the same key as the LoRA adapter's rank; a preset sets both at once

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        if self.corda_method not in ("ipm", "kpm"):
            raise ConfigError(f"method.corda_method={self.corda_method!r} is invalid; valid choices: ipm, kpm")


@params_for("init", "eva", requires_adapter=("lora",))
@dataclass
class EvaParams:
    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ConfigError(f"method.rho={self.rho!r} is invalid; it must be >= 1.0")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"method.tau={self.tau!r} is invalid; it must be in (0, 1]")


@params_for("init", "lora_ga", requires_adapter=("lora",))
@dataclass
class LoraGaParams:
    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16
    cache_gradients: bool = True  # reuse the gradient estimate (same model, data, batches; same seed where it matters)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"method.direction={self.direction!r} is invalid; valid choices: {', '.join(DIRECTIONS)}")
        if self.scale not in SCALES:
            raise ConfigError(f"method.scale={self.scale!r} is invalid; valid choices: {', '.join(SCALES)}")
        if self.stable_gamma <= 0:
            raise ConfigError(f"method.stable_gamma={self.stable_gamma!r} is invalid; it must be > 0")


@params_for("init", "pissa", requires_adapter=("lora",))
@dataclass
class PissaParams:
    niter: int = 0

    def __post_init__(self) -> None:
        check_positive("method.niter", self.niter, allow_zero=True)


@params_for("init", "nf4", requires_adapter=("lora",))
@dataclass
class Nf4Params:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    requires_cuda: bool = True  # read by the method matrix test; cannot be switched off

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"method.quant_type={self.quant_type!r} is invalid; valid choices: nf4, fp4")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"method.compute_dtype={self.compute_dtype!r} is invalid; valid choices: {', '.join(COMPUTE_DTYPES)}"
            )
        # CUDA and bitsandbytes: Nf4Init.check_backend (it asks torch)


@params_for("init", "loftq", requires_adapter=("lora",))
@dataclass
class LoftqParams:
    loftq_bits: int = 4
    loftq_iter: int = 1
    requires_cuda: bool = True  # read by the method matrix test; cannot be switched off

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise ConfigError(f"method.loftq_bits={self.loftq_bits!r} is invalid; valid choices: 4, 8")
        if self.loftq_iter < 1:
            raise ConfigError(f"method.loftq_iter={self.loftq_iter!r} is invalid; it must be >= 1")
        # CUDA and bitsandbytes: LoftqInit.check_backend (it asks torch)


params_for("init", "olora", requires_adapter=("lora",))(NoParams)
