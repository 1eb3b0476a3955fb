"""SaRA's hyper-parameters (adapter ``sara`` and procedure ``sara``, lorabench/methods/adapters/sara.py and
lorabench/methods/procedures/sara.py); torch-free.

Adapter: which entries of each target weight train. ``sara_per_mille`` (the size knob, an integer so that
a budget can size it and the count is exact): the floor(per_mille * d_out * d_in / 1000) entries of
smallest |W0| in each target; 100 = the bottom 10%, the lower end of the paper's "smallest 10% to 20%
of parameters by absolute value do not contribute". ``sara_threshold`` (off by default) is the authors'
literal rule instead: every entry with |W0| < threshold, one absolute value for every target (their
script: ``--threshold=2e-3`` on Stable Diffusion weights); the count then depends on the weights.

Procedure: the authors' script (``finetune.sh``): ``--lambda_rank=0.0005`` (the nuclear-norm weight; their
argparse default is 0), ``--progressive_iter=2500`` of 5005 steps (re-selection once, at about half
the run: ``sara_progressive_fraction`` 0.5; ``sara_progressive_step`` pins an absolute step). The
nuclear norm goes on one layer per step drawn among those with min(d_out, d_in) > 64 (their
``low_rank_ids``) whose mask holds more than 100 entries (their ``adamw2.py``). ``sara_reselect``:
``restart`` (their default optimizer ``optim/adamw.py``: a fresh optimizer state for the re-selected
entries and no update at the re-selection step) or ``continue`` (their ``optim/adamw2.py``, used with
``--disable_ub``: the state carries on and that step updates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lorabench.config import check_choice, check_positive, check_range
from lorabench.errors import ConfigError
from lorabench.method_params.registry import ZERO_BETWEEN_BACKWARD_AND_STEP, params_for

RESELECT_MODES = ("restart", "continue")


@params_for("adapter", "sara")
@dataclass
class SaraParams:
    sara_per_mille: int = 100  # entries of smallest |W0| per target, in 1/1000 of d_out * d_in
    sara_threshold: Optional[float] = None  # the authors' absolute rule |W0| < threshold (2e-3); overrides the share

    def __post_init__(self) -> None:
        if isinstance(self.sara_per_mille, bool) or not 1 <= self.sara_per_mille <= 1000:
            raise ConfigError(
                f"method.sara_per_mille={self.sara_per_mille!r} is invalid; it must be an integer in 1..1000"
            )
        if self.sara_threshold is not None:
            check_positive("method.sara_threshold", self.sara_threshold)


@params_for(
    "procedure",
    "sara",
    requires_adapter=("sara",),
    sharding="re-selects and masks the smallest-|w| entries of whole weights in place between steps",
    zero=ZERO_BETWEEN_BACKWARD_AND_STEP,
)
@dataclass
class SaraProgressiveParams:
    sara_lambda_rank: float = 5.0e-4  # weight of the nuclear norm ||M * W||_* of one drawn layer per step
    sara_rank_min_dim: int = 64  # layers with min(d_out, d_in) > this are drawn for the nuclear norm
    sara_rank_min_entries: int = 100  # ... and only while their mask holds more entries than this
    sara_progressive_fraction: Optional[float] = 0.5  # re-select after int(fraction * max_steps) steps; null: never
    sara_progressive_step: Optional[int] = None  # re-select after this many steps (overrides the fraction)
    sara_reselect: str = "restart"  # restart (optim/adamw.py) | continue (optim/adamw2.py)

    def __post_init__(self) -> None:
        check_positive("method.sara_lambda_rank", self.sara_lambda_rank, allow_zero=True)
        check_positive("method.sara_rank_min_dim", self.sara_rank_min_dim, allow_zero=True)
        check_positive("method.sara_rank_min_entries", self.sara_rank_min_entries, allow_zero=True)
        if self.sara_progressive_fraction is not None:
            check_range("method.sara_progressive_fraction", self.sara_progressive_fraction, 0.0, 1.0, closed_low=False)
        if self.sara_progressive_step is not None:
            check_positive("method.sara_progressive_step", self.sara_progressive_step)
        check_choice("method.sara_reselect", self.sara_reselect, RESELECT_MODES)

    def reselect_after(self, max_steps: int) -> int | None:
        """Optimizer steps taken before the re-selection (the authors' ``progressive_iter``); None: never."""
        if self.sara_progressive_step is not None:
            return self.sara_progressive_step
        if self.sara_progressive_fraction is None:
            return None
        return max(1, int(self.sara_progressive_fraction * max_steps))
