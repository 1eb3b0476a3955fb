"""The adapters' hyper-parameters: one ``Params`` dataclass per adapter (torch-free).

Each class declares the ``method.<key>`` values its adapter reads, their defaults (the papers' or
the authors' scripts' where there are any; the comments say which) and the checks that need
nothing but the values. The adapter module (lorabench/methods/adapters/<name>.py) sets
``Params = <the class>`` and holds the update rule; its docstring cites the paper. This module
imports neither torch nor peft, so ``lorabench train`` refuses a bad value before loading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.registry import params_for

# hydra_lora: the down-projections' init (language release | CLIP | VTAB)
INITS = ("kaiming", "normal", "xavier")
# lamda
RANK_ALLOCATIONS = ("uniform", "spectrum")
FACTOR_INITS = ("lora", "svd")
# lora_sb
SVDS = ("exact", "lowrank")
# miss
MODES = {"miss": True, "bat": "bat", "mini": "mini"}  # our name -> peft's init_weights
# nola
COEF_BITS = (2, 3, 4, 5, 6, 7, 8)
# xlora
PEFT_ADAPTER_DIR = "peft_adapter"  # where the training loop saves peft adapters in a run folder


def expert_path(path: str) -> str:
    """A peft adapter folder: ``path`` itself or ``path/peft_adapter`` (a lorabench run folder)."""
    for candidate in (Path(path) / PEFT_ADAPTER_DIR, Path(path)):
        if (candidate / "adapter_config.json").is_file():
            return str(candidate)
    raise ConfigError(
        f"method.experts: {path!r} is neither a lorabench LoRA run folder (with {PEFT_ADAPTER_DIR}/) "
        "nor a peft adapter folder (with adapter_config.json)"
    )


# increlora: sizing r_max from the procedure's schedule
# the authors' components per module per round for a target average rank (RankAllocator's rank_dic)
PER_ROUND = {2: 1, 4: 2, 6: 3, 8: 4}


def components_per_round(target_r: int, incre_rank_num: int) -> int:
    """``incre_rank_num`` if set, else the authors' table for ``target_r``."""
    if incre_rank_num:
        return incre_rank_num
    if target_r not in PER_ROUND:
        raise ConfigError(
            f"method.incre_rank_num=0 takes the authors' table, which covers method.target_r in "
            f"{sorted(PER_ROUND)} only (got {target_r}); set method.incre_rank_num"
        )
    return PER_ROUND[target_r]


def allocation_rounds(n: int, init_r: int, target_r: int, top_h: int, per_round: int) -> int:
    """Rounds until the total active rank reaches target_r * n, each giving ``per_round`` components to
    min(top_h, budget left) modules (ties can only add modules, so never more rounds than this)."""
    total, budget, rounds = init_r * n, target_r * n, 0
    while total < budget:
        total += min(top_h, budget - total, n) * per_round
        rounds += 1
    return rounds


def auto_r_max(n: int, init_r: int, target_r: int, top_h: int, per_round: int) -> int:
    """init_r + per_round (rounds + 1): room for a module chosen at every round, and its reserves."""
    return init_r + per_round * (allocation_rounds(n, init_r, target_r, top_h, per_round) + 1)


@params_for("adapter", "adalora")
@dataclass
class AdaLoraParams:
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    ipt_beta1: float = 0.85  # EMA of the sensitivity (peft: beta1; renamed to not clash with AdamW's)
    ipt_beta2: float = 0.85  # EMA of the uncertainty (peft: beta2)
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        for key in ("init_r", "target_r", "alpha", "delta_t"):
            check_positive(f"method.{key}", getattr(self, key))
        for key in ("tinit", "tfinal", "orth_reg_weight"):
            check_positive(f"method.{key}", getattr(self, key), allow_zero=True)
        if self.target_r > self.init_r:
            raise ConfigError(f"method.target_r={self.target_r} must be <= method.init_r={self.init_r}")
        for key in ("ipt_beta1", "ipt_beta2", "dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)!r} is invalid; it must be in [0, 1)")


@params_for("adapter", "dylora")
@dataclass
class DyLoraParams:
    rank: int = 8  # r_max
    r_min: int = 1
    alpha: float = 16.0
    eval_rank: int = 0  # 0 = r_max

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if not 1 <= self.r_min <= self.rank:
            raise ConfigError(f"method.r_min={self.r_min!r} is invalid; it must be in [1, method.rank={self.rank}]")
        if not 0 <= self.eval_rank <= self.rank:
            raise ConfigError(
                f"method.eval_rank={self.eval_rank!r} is invalid; it must be in [0, method.rank={self.rank}] (0 = rank)"
            )


@params_for("adapter", "flora")
@dataclass
class FloraParams:
    rank: int = 8
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.scale", self.scale)


@params_for("adapter", "hydra_lora")
@dataclass
class HydraParams:
    rank: int = 4  # parallel branch (authors' GLUE scripts: --hydra_par_r 4)
    seq_rank: int = 0  # sequential branch; 0 = 2 x rank (their --hydra_seq_r 8)
    scale: float = 1.0  # s on both branches (the language release has none)
    bias: bool = False  # branch biases (their CLIP / VTAB releases: true)
    down_init: str = "kaiming"  # down-projections: kaiming (language release) | normal (CLIP) | xavier (VTAB)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.seq_rank", self.seq_rank, allow_zero=True)
        check_positive("method.scale", self.scale)
        if self.down_init not in INITS:
            raise ConfigError(f"method.down_init={self.down_init!r} is invalid; valid choices: {', '.join(INITS)}")

    @property
    def sequential_rank(self) -> int:
        return self.seq_rank or 2 * self.rank


@params_for("adapter", "increlora")
@dataclass
class IncreLoraParams:
    rank: int = 0  # r_max per layer (preallocated); 0: sized from the schedule (auto_r_max)
    init_r: int = 1  # active components per layer at the start (the authors' lora_r)
    alpha: float = 16.0
    dropout: float = 0.3  # the authors' SST-2 rank-8 script
    # the procedure's schedule, read here to size r_max (the same keys as the procedure's)
    target_r: int = 8
    add_per_round: int = 6
    incre_rank_num: int = 0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank, allow_zero=True)
        check_positive("method.init_r", self.init_r)
        check_positive("method.alpha", self.alpha)
        check_positive("method.incre_rank_num", self.incre_rank_num, allow_zero=True)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")
        per_round = components_per_round(self.target_r, self.incre_rank_num)
        if self.rank and self.rank < self.init_r + per_round:
            raise ConfigError(
                f"method.rank={self.rank} is too small: it must hold init_r={self.init_r} components and "
                f"{per_round} reserves (method.rank=0 sizes it from the schedule)"
            )

    def r_max(self, n_targets: int) -> int:
        if self.rank:
            return self.rank
        per_round = components_per_round(self.target_r, self.incre_rank_num)
        return auto_r_max(n_targets, self.init_r, self.target_r, self.add_per_round, per_round)


@params_for("adapter", "lamda")
@dataclass
class LamdaParams:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1  # the authors' LoraConfig(lora_dropout=0.1)
    factor_init: str = "lora"  # "svd": LaMDA++'s SVD init (module docstring)
    rank_allocation: str = "uniform"  # "spectrum": LaMDA++'s per-layer ranks (module docstring)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")
        for key, choices in (("factor_init", FACTOR_INITS), ("rank_allocation", RANK_ALLOCATIONS)):
            if getattr(self, key) not in choices:
                raise ConfigError(
                    f"method.{key}={getattr(self, key)!r} is invalid; valid choices: {', '.join(choices)}"
                )


@params_for("adapter", "loldu")
@dataclass
class LolduParams:
    rank: int = 0  # 0 = every pivot (min(d_out, d_in) per target); the authors' default config: 768
    alpha: float = 1.0  # sigma = alpha / r (the authors' from_linear: lora_alpha = 1)
    train_scalar: bool = False  # the authors train vector_z only

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank, allow_zero=True)
        check_positive("method.alpha", self.alpha)


@params_for("adapter", "lora")
@dataclass
class LoraParams:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_dora: bool = False  # DoRA: magnitude/direction decomposition
    use_rslora: bool = False  # rsLoRA: scale alpha / sqrt(r)
    freeze_a: bool = False  # FFA-LoRA: A frozen at its random init, only B trains

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")


@params_for("adapter", "lora_sb")
@dataclass
class LoraSbParams:
    rank: int = 24  # the authors' GLUE scripts (96 for arithmetic / commonsense)
    scale: float = 1.0  # s; the authors' scripts set lora_alpha = r
    grad_estimate: str = "sign"  # "sign": -lr_1 sign(G) (Adam's first step); "gradient": -lr_1 G
    warmup_ratio: float = 0.06  # lr_1 = lr / (warmup_ratio * max_steps); keep equal to train.warmup_ratio; 0 = lr
    apply_first_update: bool = True  # start from W0 + s B R A (the authors' code); false subtracts R0
    svd: str = "exact"  # exact: torch.linalg.svd; lowrank: the authors' svd_lowrank + bfloat16 factors

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.scale", self.scale)
        if self.grad_estimate not in ("sign", "gradient"):
            raise ConfigError(f"method.grad_estimate={self.grad_estimate!r} is invalid; use 'sign' or 'gradient'")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"method.warmup_ratio={self.warmup_ratio!r} is invalid; it must be in [0, 1)")
        if self.svd not in SVDS:
            raise ConfigError(f"method.svd={self.svd!r} is invalid; valid choices: {', '.join(SVDS)}")


@params_for("adapter", "lora_xs")
@dataclass
class LoraXsParams:
    rank: int = 8
    alpha: float = 16.0
    r_init_std: float = 0.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@params_for("adapter", "miss")
@dataclass
class MissParams:
    rank: int = 64
    mode: str = "miss"
    mini_r: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.mini_r", self.mini_r)
        if self.mode not in MODES:
            raise ConfigError(f"method.mode={self.mode!r} is invalid; valid choices: {', '.join(MODES)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")


@params_for("adapter", "inttune")
@params_for("adapter", "nlora")
@dataclass
class NloraParams:
    rank: int = 8
    alpha: float = 8.0  # the authors' lora_alpha = lora_rank (s = 1)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@params_for("adapter", "nola")
@dataclass
class NolaParams:
    rank: int = 8
    num_basis_a: int = 512  # k
    num_basis_b: int = 512  # l
    alpha: float = 8.0
    basis_seed: int = 0
    # quantised coefficients (module docstring); off by default. Not in conf/method/nola.yaml as keys, so
    # that existing run ids stay the same: set them with +method.coef_bits=4 (+method.quant_aware=false).
    coef_bits: Optional[int] = None  # null (off) or 2..8
    quant_aware: bool = True  # QAT with a straight-through estimator; false: post-training quantisation

    def __post_init__(self) -> None:
        for key in ("rank", "num_basis_a", "num_basis_b", "alpha"):
            check_positive(f"method.{key}", getattr(self, key))
        if self.coef_bits is not None and (
            isinstance(self.coef_bits, bool) or not isinstance(self.coef_bits, int) or self.coef_bits not in COEF_BITS
        ):
            raise ConfigError(
                f"method.coef_bits={self.coef_bits!r} is invalid; valid choices: null (off), "
                f"{', '.join(map(str, COEF_BITS))}"
            )


@params_for("adapter", "randlora")
@dataclass
class RandLoraParams:
    rank: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    sparse: bool = False
    very_sparse: bool = False
    projection_seed: int = 0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")
        if self.sparse and self.very_sparse:
            raise ConfigError("method.sparse and method.very_sparse are exclusive; set at most one to true")


@params_for("adapter", "salt")
@dataclass
class SaltParams:
    rank: int = 8  # r: top singular values with scale and shift (absolute)
    lora_rank: int = 8  # q: rank of the update of the remaining singular-value block
    # the authors' SAM 2 rule r = max(1, int(rank_ratio * min(d_out, d_in))) per layer, in place of rank
    rank_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        for key in ("rank", "lora_rank"):
            check_positive(f"method.{key}", getattr(self, key))
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise ConfigError(f"method.rank_ratio={self.rank_ratio!r} is invalid; use null or a value in (0, 1]")

    def rank_for(self, d_out: int, d_in: int) -> int:
        if self.rank_ratio is None:
            return self.rank
        return max(1, int(min(d_out, d_in) * self.rank_ratio))


@params_for("adapter", "slora")
@dataclass
class SloraParams:
    rank: int = 8
    alpha: float = 8.0  # the authors' lora_alpha = lora_rank (s = 1)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@params_for("adapter", "milora")
@dataclass
class MinorParams:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@params_for("adapter", "soma")
@dataclass
class SomaParams(MinorParams):
    alpha: float = 8.0  # SoMA's configs: lora_alpha = r (s = 1)
    freeze_first_blocks: int = 0  # K: transformer blocks 0..K-1 get no adapter (authors: 8 of 24)
    freeze_first_fraction: float = 0.0  # or K = round(fraction x L) (soma_recipe: 1/3, the authors' 8/24)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("method.freeze_first_blocks", self.freeze_first_blocks, allow_zero=True)
        if not 0 <= self.freeze_first_fraction < 1:
            raise ConfigError(
                f"method.freeze_first_fraction={self.freeze_first_fraction!r} is invalid; it must be in [0, 1)"
            )
        if self.freeze_first_blocks and self.freeze_first_fraction:
            raise ConfigError(
                f"method.freeze_first_blocks={self.freeze_first_blocks} and method.freeze_first_fraction="
                f"{self.freeze_first_fraction} are both set; set only one of them"
            )

    def frozen_count(self, num_blocks: int) -> int:
        """K for a model with ``num_blocks`` transformer blocks."""
        if self.freeze_first_fraction:
            return round(self.freeze_first_fraction * num_blocks)
        return self.freeze_first_blocks


@params_for("adapter", "sora")
@dataclass
class SoraParams:
    rank: int = 8  # r_max
    alpha: float = 16.0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)


@params_for("adapter", "svfit")
@dataclass
class SvfitParams:
    rank: int = 0  # 0 = every singular value (min(d_out, d_in) per target)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank, allow_zero=True)


@params_for("adapter", "vera")
@dataclass
class VeraParams:
    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} is invalid; it must be in [0, 1)")


@params_for("adapter", "xlora")
@dataclass
class XLoraParams:
    experts: list[str] = field(default_factory=list)
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout: float = 0.2
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    layerwise_scalings: bool = False

    def __post_init__(self) -> None:
        if len(self.experts) < 2:
            raise ConfigError(
                f"method.experts={self.experts!r}: X-LoRA needs at least 2 trained LoRA experts "
                "(run folders of LoRA runs on the same base model); see scripts/xlora.py"
            )
        self.experts = [expert_path(p) for p in self.experts]
