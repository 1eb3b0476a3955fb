"""The optimizers' hyper-parameters: one ``Params`` dataclass per optimizer builder (torch-free).

As in lorabench/method_params/adapters.py: the values each optimizer reads, their defaults (the
papers' or the reference code's; the comments say which) and the checks that need nothing but the
values; the optimizer module (lorabench/methods/optimizers/<name>.py) sets ``Params = <the class>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.registry import ZERO_NEEDS_MATRICES, NoParams, params_for

# galore family (lorabench/methods/optimizers/projectors.py): which side of G (m x n) a projector
# works on, by galore-torch's proj_type rule (std: the smaller dimension)
SIDE_RULES = {
    "std": lambda m, n: "left" if m < n else "right",
    "reverse_std": lambda m, n: "right" if m < n else "left",
    "left": lambda m, n: "left",
    "right": lambda m, n: "right",
}
# allora
NORMS = ("row", "tensor")
# galore_torch (galore-torch's own proj_type values)
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
# lora_pro
MODES = ("full", "efficient")

# why galore-torch's optimizer cannot run on FSDP2 shards (lorabench.distributed); lorabench's own GaLore
# family gathers each projected gradient instead (galore_family.py)
PROJECTS_WHOLE_GRADIENT = (
    "(galore-torch's own optimizer) projects each weight's whole gradient matrix onto an SVD subspace, and an "
    "FSDP shard holds only some of its rows; method=galore runs the same rule under FSDP (it gathers each "
    "projected gradient)"
)


@params_for("optimizer", "adamw")
@dataclass
class AdamWParams:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@params_for("optimizer", "allora", requires_adapter=("lora",), zero=ZERO_NEEDS_MATRICES)
@dataclass
class ALLoRAParams:
    allora_eta: float = 1.0  # the coefficient's bound: 1 / sqrt(‖θ_row‖² + 1/η²) <= η
    allora_norm: str = "row"  # row: one coefficient per row of A and B; tensor: one per tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_positive("method.allora_eta", self.allora_eta)
        check_choice("method.allora_norm", self.allora_norm, NORMS)


@params_for(
    "optimizer", "dct_adamw", zero=ZERO_NEEDS_MATRICES
)  # FSDP2: gathers each projected gradient (galore_family.py)
@dataclass
class DCTAdamWParams:
    rank: int = 8
    update_proj_gap: int = 1
    max_shape: int = 32_000  # weights with a dimension >= this get full-size AdamW moments
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.update_proj_gap", self.update_proj_gap)
        check_positive("method.max_shape", self.max_shape)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"method.{name}={value!r} is invalid; it must be in [0, 1)")
        check_positive("method.eps", self.eps)


# what galore and fira share (no component of its own)
@dataclass
class ProjectedAdamParams:
    rank: int = 8
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.update_proj_gap", self.update_proj_gap)
        check_positive("method.scale", self.scale)
        check_choice("method.proj_type", self.proj_type, tuple(SIDE_RULES))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"method.{name}={value!r} is invalid; it must be in [0, 1)")
        check_positive("method.eps", self.eps)


@params_for(
    "optimizer", "galore", zero=ZERO_NEEDS_MATRICES
)  # FSDP2: gathers each projected gradient (galore_family.py)
@dataclass
class GaLoreParams(ProjectedAdamParams):
    projector: str = "svd"  # svd (the paper), randomized_svd, random
    layerwise: bool = False  # per-layer weight updates in the backward pass (paper §4.3): no full gradient held

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.projector", self.projector, ("svd", "randomized_svd", "random"))


@params_for("optimizer", "fira", zero=ZERO_NEEDS_MATRICES)  # FSDP2: gathers each projected gradient (galore_family.py)
@dataclass
class FiraParams(ProjectedAdamParams):
    gamma: float = 1.01  # norm-growth limiter
    fira_residual: str = "package"  # package: S = G - scale·P R (the authors' code); exact: G - P R (paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gamma >= 1.0:
            raise ConfigError(f"method.gamma={self.gamma!r} is invalid; the norm-growth limit must be >= 1")
        check_choice("method.fira_residual", self.fira_residual, ("package", "exact"))


@params_for(
    "optimizer", "frugal", zero=ZERO_NEEDS_MATRICES
)  # FSDP2: gathers each projected gradient (galore_family.py)
@dataclass
class FrugalParams:
    density: float = 0.25
    update_gap: int = 200
    projector: str = "svd"
    inactive_update_rule: str = "sign_sgd"
    inactive_lr_scale: float = 0.1
    proj_params_lr_scale: float = 1.0
    reset_statistics: bool = True
    proj_type: str = "std"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"method.density={self.density!r} is invalid; it must be in (0, 1]")
        check_positive("method.update_gap", self.update_gap)
        check_choice("method.projector", self.projector, ("svd", "random", "randk", "blocks"))
        check_choice("method.inactive_update_rule", self.inactive_update_rule, ("sign_sgd", "sgd", "none"))
        check_positive("method.inactive_lr_scale", self.inactive_lr_scale, allow_zero=True)
        check_positive("method.proj_params_lr_scale", self.proj_params_lr_scale)
        check_choice("method.proj_type", self.proj_type, tuple(SIDE_RULES))
        check_positive("method.eps", self.eps)


# galore_torch.py imports it as GaLoreParams (the name above is the galore optimizer's)
@params_for("optimizer", "galore_torch", sharding=PROJECTS_WHOLE_GRADIENT, zero=ZERO_NEEDS_MATRICES)
@dataclass
class GaLoreTorchParams:
    rank: int = 8
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.update_proj_gap", self.update_proj_gap)
        check_positive("method.scale", self.scale)
        check_choice("method.proj_type", self.proj_type, PROJ_TYPES)


@params_for(
    "optimizer",
    "lora_pro",
    requires_adapter=("lora",),
    sharding="solves for each LoRA pair's gradients from both whole factors (their Gram matrices and products)",
    zero=ZERO_NEEDS_MATRICES,
)
@dataclass
class LoraProParams:
    lora_pro_mode: str = "full"  # full: Adam on the equivalent gradient (released code); efficient: AdamW on A, B
    lora_pro_ridge: float = 1e-8  # added to BᵀB and AAᵀ before inverting (the authors' delta)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice("method.lora_pro_mode", self.lora_pro_mode, MODES)
        if not self.lora_pro_ridge > 0:
            raise ConfigError(f"method.lora_pro_ridge={self.lora_pro_ridge!r} is invalid; it must be > 0")


@params_for("optimizer", "loraplus", requires_adapter=("lora",))
@dataclass
class LoraPlusParams:
    loraplus_lr_ratio: float = 16.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_positive("method.loraplus_lr_ratio", self.loraplus_lr_ratio)


@params_for(
    "optimizer",
    "q_galore",
    sharding="keeps the 8-bit Adam moments of its non-projected parameters in blocks of 256 over each whole "
    "flattened tensor, which an FSDP shard does not hold",
    zero=ZERO_NEEDS_MATRICES,
)
@dataclass
class QGaLoreParams:
    rank: int = 8
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"  # the only side rule the authors implement
    proj_bits: int = 4  # 4 or 8 (asymmetric, per group); 32 = fp32 basis
    proj_group_size: int = 256  # entries per quantization group; -1 = one group per row of the stored basis
    cos_threshold: float = 0.4  # mean signed cosine of successive leading singular vectors that grows the gap
    queue_size: int = 5  # cosines averaged (the queue is never cleared)
    gamma_proj: int = 2  # the layer's gap is multiplied by this at each SVD while the mean is >= threshold
    min_8bit_size: int = 4096  # tensors with fewer entries keep fp32 moments (bitsandbytes' default)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.update_proj_gap", self.update_proj_gap)
        check_positive("method.scale", self.scale)
        check_choice("method.proj_type", self.proj_type, ("std",))
        check_choice("method.proj_bits", self.proj_bits, (4, 8, 32))
        if self.proj_group_size == 0 or self.proj_group_size < -1:
            raise ConfigError(
                f"method.proj_group_size={self.proj_group_size!r} is invalid; it must be >= 1 (-1: a group per row)"
            )
        if not -1.0 <= self.cos_threshold <= 1.0:
            raise ConfigError(f"method.cos_threshold={self.cos_threshold!r} is invalid; it must be in [-1, 1]")
        check_positive("method.queue_size", self.queue_size)
        if self.gamma_proj < 1:
            raise ConfigError(f"method.gamma_proj={self.gamma_proj!r} is invalid; the gap factor must be >= 1")
        check_positive("method.min_8bit_size", self.min_8bit_size, allow_zero=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"method.{name}={value!r} is invalid; it must be in [0, 1)")
        check_positive("method.eps", self.eps)


params_for(
    "optimizer",
    "lorafa",
    requires_adapter=("lora",),
    sharding="projects B's gradient through the whole frozen A (peft's LoraFAOptimizer forms A's Gram matrix)",
    zero=ZERO_NEEDS_MATRICES,
)(NoParams)
