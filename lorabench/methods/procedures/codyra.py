"""CoDyRA's rank selection (Lu et al., 2024, arXiv:2412.01004): a threshold on the gates g of every CoDyRA
layer after each optimizer step, on a schedule over the run, as the authors' ``train_model``
(Artificer-AI-Lab/CoDyRA ``models/codyra.py``) does it.

The gates train with A and B in the run's AdamW (the authors' one ``torch.optim.AdamW`` over every
trainable tensor); no term is added to the loss (their layers return an auxiliary loss of 0). The
sparsity is the proximal step alone. With T = ``train.max_steps``, iteration i = 0, 1, ..., T - 1 (the
optimizer step just taken, ``on_step_end(step)`` with step = i + 1):

* D = dense_fraction * T (a float), L = int((T - D) // lambda_num), thresholds
  lambda_k = numpy.linspace(0, max_kappa, lambda_num)[k];
* the threshold of iteration i is lambda_min(k_i, lambda_num - 1), with k_i the number of iterations
  j <= i with j >= D and j % L == 0 (the authors raise the index at the start of those iterations);
  when L = 0 (a run shorter than D + lambda_num steps) it stays lambda_0 = 0, so nothing is pruned;
* after the step of every iteration i > D (strictly), with tau that threshold: entries g > tau lose
  tau, entries g < -tau gain tau, then every entry with |g| < tau is set to 0 (sora.sparse_threshold_,
  the same three in-place statements as the authors'), so an entry with tau < |g| < 2 tau ends at 0
  where the soft threshold sign(g) max(|g| - tau, 0) would keep |g| - tau. The threshold is not
  multiplied by the learning rate.

So the first half of the run (dense_fraction 0.5) trains the full rank r, the second half raises the
threshold in lambda_num steps of L iterations to max_kappa; a gate at 0 comes back only if one
optimizer step lifts it beyond 2 tau. The learning-rate schedule is the run's
(the authors': cosine, no warm-up: train.schedule=cosine, train.warmup_ratio=0).

``state()`` reports each module's active rank (non-zero gates, the authors' ``count_nonzero(gate)``),
their total and share of zeros (the authors' "total Zero ranks"), the last threshold, D and L.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lorabench.method_params.adapters_codyra import CodyraThresholdParams
from lorabench.methods.adapters.codyra import CODYRA_REPO, CodyraLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.procedures.sora import sparse_threshold_
from lorabench.registry import PROCEDURES


class ThresholdSchedule:
    """The authors' threshold per iteration, in closed form (nothing to carry across a resume)."""

    def __init__(self, total: int, params: CodyraThresholdParams):
        self.total = total
        self.dense = params.dense_fraction * total  # the authors' dense_iters, a float
        self.every = int((total - self.dense) // params.lambda_num)  # their lambda_step_iters
        self.values = np.linspace(0, params.max_kappa, params.lambda_num)

    def index(self, iteration: int) -> int:
        """How many times the authors' threshold_id has been raised by the start of ``iteration``."""
        if self.every <= 0:
            return 0
        first = -(-math.ceil(self.dense) // self.every) * self.every  # the first j >= D with j % L == 0
        return 0 if iteration < first else (iteration - first) // self.every + 1

    def threshold(self, iteration: int) -> float:
        return float(self.values[min(len(self.values) - 1, self.index(iteration))])

    def prunes(self, iteration: int) -> bool:
        return iteration > self.dense


@PROCEDURES.register("codyra")
class CodyraThreshold(Procedure):
    Params = CodyraThresholdParams
    paper = "Lu et al., 2024, arXiv:2412.01004"
    fidelity = Fidelity(
        reference=f"{CODYRA_REPO} models/codyra.py (train_model: lambdas, dense_iters, lambda_step_iters, the"
        " gate threshold after optimizer.step), utils.py (cosine_lr), runner_codyra.sh",
        status="parity",
        tolerance="max |Δ| <= 1e-6 of the final A, B, g, float64 checksums within 1e-5 at every step, the"
        " threshold and lr of every step within 1e-12, the same gates exactly 0 after every step (fp32, CPU,"
        " 12 to 100 steps, with the codyra adapter; 0 seen at the fixture's 12 digits)",
        fixture="tests/fixtures/parity/codyra.json",
        deviations=(
            "T is train.max_steps (optimizer steps) where the authors count iterations of one task;"
            " lorabench's schedule steps once per optimizer step, after gradient accumulation",
            "the learning-rate schedule is the run's (train.schedule, train.warmup_ratio: linear with 6% warm-up"
            " by default); the authors' cosine_lr without warm-up is train.schedule=cosine train.warmup_ratio=0"
            " (the same values, checked by the parity test)",
            "one run: the authors repeat the schedule for each task of a sequence and merge between tasks",
        ),
        unchecked=(
            "their loss (CLIP image-text cross-entropy in both directions) is replaced by the shared"
            " regression case; the rule acts on gradients whatever the loss",
        ),
    )
    requires_adapter = ("codyra",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: CodyraThresholdParams, ctx: MethodContext
    ) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, CodyraLayer)}
        if not self.layers:
            raise ValueError("the codyra procedure found no CoDyRA layers")
        self.params = params
        self.schedule = ThresholdSchedule(max(ctx.max_steps, 1), params)
        self.current_threshold = self.schedule.threshold(0)
        self.steps_done = 0

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        iteration = step - 1  # the step just taken, 0-based as the authors' loop counter
        self.current_threshold = self.schedule.threshold(iteration)
        self.steps_done = step
        if not self.schedule.prunes(iteration):
            return
        for layer in self.layers.values():
            sparse_threshold_(layer.gate, self.current_threshold)

    def state(self) -> dict:
        ranks = {name: m.active_rank() for name, m in self.layers.items()}
        full = sum(m.gate.numel() for m in self.layers.values())
        return {
            "codyra_ranks": ranks,
            "codyra_active_ranks": sum(ranks.values()),
            "codyra_zero_rank_share": (full - sum(ranks.values())) / full if full else 0.0,
            "codyra_threshold": self.current_threshold,
            "codyra_dense_steps": self.schedule.dense,
            "codyra_threshold_every": self.schedule.every,
        }

    def state_dict(self) -> dict:
        return {"threshold": self.current_threshold, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.current_threshold, self.steps_done = float(state["threshold"]), int(state["steps_done"])
