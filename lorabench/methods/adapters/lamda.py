"""LaMDA and LaMDA++ (Azizi et al., 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation", arXiv:2406.12832, EMNLP 2024 Findings), our own layer (slora.TriLayer).

Update rule: y = W0 x + s PMB S PMA drop(x) with PMA (r x d_in) frozen, a trainable square core S
(r x r) and PMB (d_out x r) trainable, its columns frozen one after another by the ``lamda``
procedure (lorabench/methods/procedures/lamda.py); s = alpha / r, drop = dropout on the adapter's
input. Trainable parameters per target: r_l d_out + r_l^2, plus the task head (r_l = r unless ranks
are allocated per layer).

Init (``factor_init``):

* ``lora`` (default; the authors' released code, ArminAzizi98/LaMDA@8ad34b46e154 ``lamda.py`` on
  peft's LoRA layer with ``init_lora_weights=True``): PMA Kaiming-uniform with a = sqrt(5),
  U(-1/sqrt(d_in), 1/sqrt(d_in)); S as a default ``nn.Linear(r, r, bias=False)``, U(-1/sqrt(r),
  1/sqrt(r)); PMB = 0, so the model is unchanged at step 0 (and S has no gradient until PMB moves).
* ``svd`` (LaMDA++, ``conf/method/lamda_plus.yaml``): SVD W0 = U Sigma V^T (float32, full SVD),
  PMA = V_r^T, PMB = U_r, S0 = diag(sigma_1..sigma_r) / s, and the initial product is subtracted
  (Delta W = s (PMB S - PMB0 S0) PMA), so the model is unchanged at step 0. The paper's LaMDA++ init
  (METHODS.md: "LaMDA++ initialises PMA and PMB from the SVD of W0"); the released code has no
  LaMDA++, so S0 = diag(Sigma_r) / s and the subtraction are our choices.

LaMDA++ rank allocation (``rank_allocation: spectrum``, only in ``lamda_plus``). The paper describes a
"lite-weight" adaptive rank allocation "via normalized spectrum analysis of pre-trained model weights";
the exact rule is in neither the released code nor METHODS.md, so this is our stated reading:

* For every targeted W0_l with singular values sigma_{l,i}, the normalised spectrum energy captured by
  the top-r directions (r = ``method.rank``) is E_l = sum_{i<=r} sigma_{l,i}^2 / sum_i sigma_{l,i}^2,
  and the residual share is rho_l = 1 - E_l (0 when W0_l = 0).
* Budget R = r * L (L targeted layers), i.e. the same average rank (and, for equal shapes, the same
  parameter count) as uniform LaMDA. Every layer gets 1; the other R - L ranks are shared in
  proportion to rho_l: x_l = 1 + (R - L) rho_l / sum_k rho_k, capped at min(d_out, d_in) (the excess
  of capped layers is re-shared among the others in proportion to rho). Integer ranks: floor(x_l),
  and the leftover units go to the largest fractional parts (ties: first layer in module order).
  If every rho_l is 0 the split is uniform.
* Why: a layer whose top-r directions already hold almost all of its energy (a steep spectrum) is
  well described by r directions; a flatter spectrum spreads the pretrained function over more
  directions, so the rank-r path spans a smaller share of it and gets more rank.

The per-layer ranks (and rho_l) are reported to the run record (``method_report.lamda_layer_ranks``,
``lamda_spectrum_residual``); ``expected_trainable`` recomputes the allocation on the unwrapped model,
so the closed-form count stays exact. Hyper-parameters (the authors' defaults where they have one):
rank r (theirs 64; the preset keeps the project's comparison rank 8), alpha (16, s = alpha / r_l per
layer as peft's LoRA), dropout (0.1, their ``LoraConfig``), factor_init, rank_allocation; the freezing
schedule lives in the procedure.

Deviations kept: the factors are drawn from a generator seeded by the run seed and the layer name (the
authors draw from torch's global generator; same distribution); S is held in the adapter dtype
(float32 for half-precision bases, as every lorabench adapter), where the authors cast it to bfloat16
because their scripts load the model in bfloat16 (a float32 model fails in their forward on the dtype
mismatch).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lorabench.errors import ConfigError
from lorabench.method_params.adapters import LamdaParams
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import (
    OwnAdapter,
    as_linear,
    check_rank,
    seeded_generator,
    target_shapes,
    top_svd,
    wrap_targets,
)
from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext, head_parameter_count
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

REPO = "ArminAzizi98/LaMDA@8ad34b46e154"


class LamdaLayer(TriLayer):
    """TriLayer with B = PMB (trainable), M = S (trainable), A = PMA (frozen); dropout on the input of
    the adapter path (drawn in the adapter dtype, as the authors' peft layer)."""

    def __init__(self, *args, dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout = dropout

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.dtype)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return super().adapter_forward(h).to(x.dtype)


def residual_energy(sv: torch.Tensor, rank: int) -> float:
    """rho = 1 - (sum of the top-``rank`` squared singular values) / (sum of all); 0 for a zero matrix."""
    energy = sv.double().square()
    total = float(energy.sum())
    return 0.0 if total <= 0 else max(0.0, 1.0 - float(energy[:rank].sum()) / total)


def allocate_ranks(residuals: list[float], rank: int, caps: list[int]) -> list[int]:
    """Integer ranks >= 1 summing to ``rank * len(residuals)``, each <= its cap, shared in proportion
    to ``residuals`` beyond the minimum of 1 (module docstring)."""
    n, budget = len(residuals), rank * len(residuals)
    if budget > sum(caps):
        raise ConfigError(f"method.rank={rank} x {n} layers exceeds the summed max ranks {sum(caps)} of the targets")
    weights = list(residuals) if sum(residuals) > 0 else [1.0] * n
    x = [1.0] * n
    free = [i for i in range(n) if caps[i] > 1]
    left = float(budget - n)
    while left > 1e-9 and free:  # water-filling: share, cap, re-share the excess
        w = sum(weights[i] for i in free)
        share = {i: left * (weights[i] / w if w > 0 else 1.0 / len(free)) for i in free}
        left = 0.0
        for i in free:
            x[i] += share[i]
            if x[i] >= caps[i]:
                left += x[i] - caps[i]
                x[i] = float(caps[i])
        free = [i for i in free if x[i] < caps[i]]
    ranks = [min(caps[i], max(1, math.floor(x[i] + 1e-9))) for i in range(n)]
    deficit = budget - sum(ranks)
    for i in sorted(range(n), key=lambda i: (x[i] - ranks[i], -i)):  # rounding noise only
        if deficit < 0 and ranks[i] > 1:
            ranks[i] -= 1
            deficit += 1
    order = sorted(range(n), key=lambda i: (-(x[i] - ranks[i]), i))
    while deficit > 0:  # largest fractional parts first; the loop only repeats on rounding noise
        for i in order:
            if deficit > 0 and ranks[i] < caps[i]:
                ranks[i] += 1
                deficit -= 1
    return ranks


def layer_ranks(model: nn.Module, targets: list[str], params: LamdaParams) -> tuple[dict[str, int], dict[str, float]]:
    """Per-target ranks (name -> r_l) and residual energy shares (empty for ``uniform``)."""
    shapes = target_shapes(model, targets)
    if params.rank_allocation == "uniform":
        return {name: params.rank for name, _, _ in shapes}, {}
    residuals = {}
    for name, _, _ in shapes:
        weight = as_linear(model.get_submodule(name)).weight
        residuals[name] = residual_energy(torch.linalg.svdvals(weight.detach().float()), params.rank)
    ranks = allocate_ranks(list(residuals.values()), params.rank, [min(o, i) for _, o, i in shapes])
    return dict(zip(residuals, ranks)), residuals


@ADAPTERS.register("lamda")
class LamdaAdapter(OwnAdapter):
    Params = LamdaParams
    paper = "Azizi et al., 2024, arXiv:2406.12832"
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py); spectrum mode: the average rank
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    fidelity = Fidelity(
        reference=f"{REPO} lamda.py (get_lamda_model on peft's LoRA Linear, init_lora_weights=True)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 AdamW steps (fp32, CPU, dropout masks shared); init rule exact",
        fixture="tests/fixtures/parity/lamda.json",
        deviations=(
            "PMA and S are drawn from a generator seeded by the run seed and the layer name, not torch's global"
            " generator: same distribution, other values (the trajectory is compared from the reference's values)",
            "S is held in the adapter dtype (float32 for half-precision bases); the authors cast it to bfloat16"
            " because their scripts load the model in bfloat16 (with a float32 model their forward fails)",
        ),
        unchecked=(
            "factor_init=svd and rank_allocation=spectrum (LaMDA++, lamda_plus): not in the released code; our"
            " reading of the paper, checked by tests/test_lamda_plus.py only",
        ),
        revision=2,
    )

    def make_layer(
        self, name: str, linear: nn.Linear, params: LamdaParams, ctx: MethodContext, rank: int | None = None
    ) -> LamdaLayer:
        r = params.rank if rank is None else rank
        check_rank(r, linear.out_features, linear.in_features, name)
        scale = params.alpha / r
        if params.factor_init == "svd":
            u, s, vh = top_svd(linear.weight, r)
            return LamdaLayer(
                linear,
                u,
                torch.diag(s / scale),
                vh,
                scale,
                train=("B", "M"),
                subtract_init=True,
                dropout=params.dropout,
            )
        gen = seeded_generator(ctx.seed, name)
        pma = kaiming_uniform(r, linear.in_features, gen)
        core = kaiming_uniform(r, r, gen)
        pmb = torch.zeros(linear.out_features, r)
        return LamdaLayer(linear, pmb, core, pma, scale, train=("B", "M"), dropout=params.dropout)

    def apply(self, model: nn.Module, params: LamdaParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        if init_kwargs:
            return super().apply(model, params, ctx, init_kwargs)  # raises the shared error
        ranks, residuals = layer_ranks(model, ctx.target_modules, params)
        ctx.extras["lamda_rank_allocation"] = params.rank_allocation
        ctx.extras["lamda_layer_ranks"] = ranks
        if residuals:
            ctx.extras["lamda_spectrum_residual"] = residuals
        return wrap_targets(
            model,
            ctx.target_modules,
            lambda n, lin: self.make_layer(n, lin, params, ctx, ranks.get(n)),
            ctx.head,
        )

    def layer_trainable(self, d_out: int, d_in: int, params: LamdaParams, rank: int | None = None) -> int:
        r = params.rank if rank is None else rank
        return r * d_out + r**2

    def expected_trainable(self, base_model: nn.Module, params: LamdaParams, ctx: MethodContext) -> int:
        """Sum of r_l d_out + r_l^2 over the targets with the same allocation as ``apply``."""
        ranks, _ = layer_ranks(base_model, ctx.target_modules, params)
        own = sum(
            self.layer_trainable(d_out, d_in, params, ranks[name])
            for name, d_out, d_in in target_shapes(base_model, ctx.target_modules)
        )
        return own + head_parameter_count(base_model, ctx.head)
