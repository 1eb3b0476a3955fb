"""The procedures' hyper-parameters: one ``Params`` dataclass per procedure (torch-free).

As in lorabench/method_params/adapters.py: the values each procedure reads, their defaults and the
checks that need nothing but the values; the procedure module (lorabench/methods/procedures/
<name>.py) sets ``Params = <the class>``. A procedure that drives one adapter's layers says so with
``requires_adapter``; BAdam and LISA train the base model's own weights (``("none",)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.adapters import components_per_round
from lorabench.method_params.registry import ZERO_BETWEEN_BACKWARD_AND_STEP, ZERO_MOVES_TRAINABLE, NoParams, params_for

# badam
SWITCH_MODES = ("ascending", "descending", "random")
NON_LAYER = ("auto", "active", "frozen", "blocks")


@params_for(
    "procedure",
    "badam",
    requires_adapter=("none",),
    ddp="switches the trained block during the run, and DDP's gradient reducer is built once for a fixed set "
    "of trainable parameters (FSDP2 handles the switch: use hardware.strategy=fsdp)",
    zero=ZERO_MOVES_TRAINABLE,
)
@dataclass
class BAdamParams:
    switch_every: int = 50  # K: Adam steps per block visit (the first visit gets K - 1)
    switch_mode: str = "ascending"  # ascending | descending | random
    badam_non_layer: str = "auto"  # auto | active | frozen | blocks: what the non-layer parameters do

    def __post_init__(self) -> None:
        check_positive("method.switch_every", self.switch_every)
        check_choice("method.switch_mode", self.switch_mode, SWITCH_MODES)
        check_choice("method.badam_non_layer", self.badam_non_layer, NON_LAYER)


@params_for("procedure", "dylora", requires_adapter=("dylora",), zero=ZERO_BETWEEN_BACKWARD_AND_STEP)
@dataclass
class DyLoraSamplingParams:
    frozen: bool = True  # the authors' GLUE scripts (set_rank(..., frozen=True) before every step)
    eval_all_ranks: bool = False  # after training, evaluate at every rank 1..r_max (the rank -> metric curve)


@params_for(
    "procedure",
    "increlora",
    requires_adapter=("increlora",),
    sharding="adds rank components (new tensors) to the adapter during the run, which FSDP2 cannot add to its shards",
    zero=ZERO_BETWEEN_BACKWARD_AND_STEP,
)
@dataclass
class IncreLoraAllocParams:
    target_r: int = 8  # average active rank per module at the end (budget target_r x modules)
    add_per_round: int = 6  # the authors' top_h: modules selected per round
    incre_rank_num: int = 0  # components per selected module; 0: the authors' table for target_r
    tinit: int = -1  # no round at steps <= tinit; -1: tinit = delta_t (every script of the authors)
    delta_t: int = 0  # steps between rounds; 0: max(1, round(interval_ratio x max_steps))
    interval_ratio: float = 0.02  # the SST-2 script's 1000 of ~50,500 steps
    ipt_beta1: float = 0.85
    ipt_beta2: float = 0.85
    orth_reg_weight: float = 0.1
    advance_learn: bool = True  # authors' default (run_glue.py advance_learn=True)
    reserve_gate: float = 1e-5  # frozen lambda of a reserved component (add_reserve_param)
    warmup_new: bool = True  # authors' multi_lr=True: new components restart the linear warm-up
    new_warmup_ratio: float = 0.06  # W = ceil(ratio * max_steps); the authors reuse the run's warm-up

    def __post_init__(self) -> None:
        for key in ("target_r", "add_per_round"):
            check_positive(f"method.{key}", getattr(self, key))
        check_positive("method.incre_rank_num", self.incre_rank_num, allow_zero=True)
        check_positive("method.delta_t", self.delta_t, allow_zero=True)
        check_positive("method.orth_reg_weight", self.orth_reg_weight, allow_zero=True)
        check_positive("method.reserve_gate", self.reserve_gate)
        if self.tinit < -1:
            raise ConfigError(f"method.tinit={self.tinit!r} is invalid; it must be >= 0, or -1 (= delta_t)")
        if not 0 < self.interval_ratio <= 1:
            raise ConfigError(f"method.interval_ratio={self.interval_ratio!r} is invalid; it must be in (0, 1]")
        for key in ("ipt_beta1", "ipt_beta2"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)!r} is invalid; it must be in (0, 1)")
        if not 0 <= self.new_warmup_ratio < 1:
            raise ConfigError(f"method.new_warmup_ratio={self.new_warmup_ratio!r} is invalid; it must be in [0, 1)")
        components_per_round(self.target_r, self.incre_rank_num)  # raises if the table has no entry


@params_for(
    "procedure",
    "lamda",
    requires_adapter=("lamda",),
    sharding="freezes columns of whole projection matrices by in-place masks between steps",
    zero=ZERO_BETWEEN_BACKWARD_AND_STEP,
)
@dataclass
class LamdaFreezeParams:
    pmb_freeze_every: float = 0.3  # eta: one more PMB column loses its gradient every eta x max_steps steps

    def __post_init__(self) -> None:
        if not 0 < self.pmb_freeze_every <= 1:
            raise ConfigError(
                f"method.pmb_freeze_every={self.pmb_freeze_every!r} is invalid; it must be in (0, 1] "
                "(a fraction of train.max_steps)"
            )


@params_for("procedure", "lisa", requires_adapter=("none",), zero=ZERO_MOVES_TRAINABLE)
@dataclass
class LisaParams:
    lisa_activated_layers: int = 2  # γ: layers unfrozen per period
    lisa_interval_steps: int = 20  # K: steps per period

    def __post_init__(self) -> None:
        check_positive("method.lisa_activated_layers", self.lisa_activated_layers)
        check_positive("method.lisa_interval_steps", self.lisa_interval_steps)


@params_for("procedure", "soma_wd")
@dataclass
class SomaWdParams:
    soma_wd_start: float = 0.05  # authors' AdamW weight_decay
    soma_wd_end: float = 1.0e-5  # authors' eta_min of the cosine weight-decay schedule

    def __post_init__(self) -> None:
        check_positive("method.soma_wd_start", self.soma_wd_start, allow_zero=True)
        check_positive("method.soma_wd_end", self.soma_wd_end, allow_zero=True)
        if self.soma_wd_end > self.soma_wd_start:
            raise ConfigError(
                f"method.soma_wd_end={self.soma_wd_end!r} exceeds method.soma_wd_start={self.soma_wd_start!r}; "
                "the schedule anneals the weight decay down"
            )


@params_for(
    "procedure",
    "sora",
    requires_adapter=("sora",),
    sharding="adds the gates' L1 term to the loss outside the model's forward, where FSDP2 holds them as shards",
    zero=ZERO_BETWEEN_BACKWARD_AND_STEP,
)
@dataclass
class SoraProximalParams:
    sparse_lambda: float = 3.0e-4  # threshold per step (authors' --sparse_lambda_2)
    l1_lambda: float = 10.0  # weight of the L1 term in the loss (authors' --sparse_lambda)
    gate_eps: float = 1.0e-6  # Adam eps of the gates (the authors' SparseAdamW keeps transformers AdamW's 1e-6)
    lambda_times_lr: bool = False
    lambda_schedule: str = "none"  # "none" or "linear"
    max_lambda: float = 1.0e-3
    lambda_num: int = 5

    def __post_init__(self) -> None:
        check_positive("method.sparse_lambda", self.sparse_lambda, allow_zero=True)
        check_positive("method.l1_lambda", self.l1_lambda, allow_zero=True)
        check_positive("method.gate_eps", self.gate_eps, allow_zero=True)
        check_positive("method.lambda_num", self.lambda_num)
        if self.lambda_schedule not in ("none", "linear"):
            raise ConfigError(f"method.lambda_schedule={self.lambda_schedule!r} is invalid; use 'none' or 'linear'")


params_for(
    "procedure",
    "adalora",
    requires_adapter=("adalora",),
    sharding="peft's rank allocator scores and masks ranks across whole lora_A/E/B tensors between steps",
    zero=ZERO_BETWEEN_BACKWARD_AND_STEP,
)(NoParams)
