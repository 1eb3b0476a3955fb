"""The GaLore family on one optimizer class and the shared projectors (projectors.py).

* GaLore (Zhao et al., 2024, arXiv:2403.03507): R = PᵀG, W -= lr·scale·P Adam(R). Defaults: rank 8,
  update_proj_gap 200 (GLUE README: 500), scale 0.25 (GLUE: 4), eps 1e-6 (galore-torch's AdamW).
* Fira (Chen et al., 2024, arXiv:2410.01623): W -= lr·(scale·P Adam(R) + φ⊙S), S = G - scale·P R
  (the authors' code, whose project_back multiplies by scale; ``fira_residual: exact`` gives the
  paper's G - P R), with φ = ‖Adam(R)‖/‖R‖ per column of R (per row when R is m x r), then the
  norm-growth limiter ‖S_t‖ <= γ‖S_{t-1}‖, γ = 1.01. Defaults: rank 8, gap 200, scale 0.25
  (pre-training scripts).
* FRUGAL (Zmushko et al., 2025, arXiv:2411.07837): AdamW on R (moments only in the subspace, reset
  when it is refreshed), state-free signSGD (or SGD) on S = G - P R at lr·inactive_lr_scale; both
  parts at lr·proj_params_lr_scale. As the authors' AdamW (and torch's): denom = sqrt(v)/sqrt(1-β2^t)
  + eps, step size lr/(1-β1^t), and the decay W *= 1 - lr·wd comes before the update (unscaled lr).
  Defaults: density 0.25 (rank = round(density·d), d = the projected side), update_gap 200,
  inactive_lr_scale 0.1 (fine-tuning; 1.0 pre-training), eps 1e-8.
* Q-GaLore (arXiv:2407.08296) subclasses this optimizer in q_galore.py (INT4 projection, lazy
  refresh, 8-bit moments).

All but FRUGAL: Adam bias correction and eps as galore-torch (denom = sqrt(v) + eps, step size
lr·sqrt(1-β2^t)/(1-β1^t)); decoupled weight decay W -= lr·wd·W after the update, on every group.
Non-projected parameters get plain AdamW in the same class, by the same rules. The projection side
follows galore-torch's ``std``: left if m < n, else right (square matrices project on the right).
Differences from the authors' code (documented choices): FRUGAL's ``blocks`` are contiguous
row/column blocks of each matrix (the authors' BAdam-like blocks are whole tensors), its ``randk``
picks rows or columns on the projected side with rank round(density·d) (the authors' CoordAdamW
picks int(density·n) columns) and its rank is at least 1.

Under FSDP2 (``hardware.strategy=fsdp``) each projected weight's gradient is gathered whole before
its projection and the projected state (basis, moments in the subspace) is kept whole on every
process: an r x n (or m x r) state, small beside the m x n weight, whose shards FSDP2 still holds.
Non-projected parameters are updated shard by shard. The updates equal the one-process run's.
Q-GaLore is refused under FSDP2: its 8-bit moments of non-projected parameters are quantized in
blocks of each whole flattened tensor.
"""

from __future__ import annotations

import math

import torch

from lorabench.distributed import local_part, whole_gradient
from lorabench.method_params.optimizers import (  # noqa: F401  (ProjectedAdamParams re-exported)
    FiraParams,
    FrugalParams,
    GaLoreParams,
    ProjectedAdamParams,
)
from lorabench.methods.base import MethodContext, OptimizerBuilder, decay_groups, target_linear_weights
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.optimizers.projectors import SIDE_RULES, Projector, make_projector
from lorabench.registry import OPTIMIZERS

RESIDUAL_RULES = ("none", "fira", "sign_sgd", "sgd")


class GaLoreFamily(torch.optim.Optimizer):
    """Adam(W) whose groups may carry ``projector`` (a name in projectors.PROJECTORS) plus rank,
    update_proj_gap, scale, proj_type, residual, residual_lr_scale, gamma, fira_residual,
    reset_on_refresh, proj_lr_scale and seed. Other groups are plain
    AdamW. Every group also carries two rules, from ``rule_defaults`` unless it sets them:
    ``eps_after_correction`` (False: denom = sqrt(v) + eps with step lr·sqrt(1-β2^t)/(1-β1^t), as
    galore-torch and fira; True: denom = sqrt(v)/sqrt(1-β2^t) + eps with step lr/(1-β1^t), as FRUGAL
    and torch.optim.AdamW) and ``decay_first`` (False: W -= lr·wd·W after the update; True: W *= 1 -
    lr·wd before it)."""

    rule_defaults: dict = {"eps_after_correction": False, "decay_first": False}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "projector": None,
            "rank": 8,
            "update_proj_gap": 200,
            "scale": 1.0,
            "proj_type": "std",
            "residual": "none",
            "residual_lr_scale": 1.0,
            "gamma": 1.01,
            "fira_residual": "package",
            "reset_on_refresh": False,
            "proj_lr_scale": 1.0,
            "seed": 0,
            **self.rule_defaults,
        }
        super().__init__(params, defaults)

    def state_dict(self) -> dict:
        """Projector objects become plain dicts, so checkpoints load with weights_only=True."""
        packed = super().state_dict()
        packed["state"] = {
            k: ({**v, "projector": v["projector"].to_state()} if "projector" in v else v)
            for k, v in packed["state"].items()
        }
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        # Rebuild projectors before torch's loader runs: it would mangle their strings. The saved keys
        # are matched to parameters through the saved groups, as torch's loader does (they are indices,
        # or parameter names in torch.distributed.checkpoint's state dicts under FSDP)
        saved = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = dict(zip(saved, (p for group in self.param_groups for p in group["params"])))
        state = {}
        for key, value in state_dict["state"].items():
            if isinstance(value.get("projector"), dict):
                device = params[key].device
                projector = Projector.from_state(value["projector"])
                for name, item in vars(projector).items():
                    if isinstance(item, torch.Tensor):
                        setattr(projector, name, item.to(device))
                value = {**value, "projector": projector}
            state[key] = value
        super().load_state_dict({**state_dict, "state": state})
        for group in self.param_groups:  # checkpoints written before a group option existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _projector(self, p, group, index):
        if group["residual"] not in RESIDUAL_RULES:
            raise ValueError(f"residual={group['residual']!r} is invalid; valid: {', '.join(RESIDUAL_RULES)}")
        return make_projector(
            group["projector"],
            p.shape,
            group["rank"],
            group["update_proj_gap"],
            proj_type=group["proj_type"],
            seed=group["seed"] * 100_003 + index,
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is not None:  # with layer-wise updates every gradient was used and freed already
                    self._step_param(p, group, index)
        return loss

    def _step_param(self, p, group: dict, index: int) -> None:
        """One parameter's update: weight decay (before or after, per ``decay_first``) and the step.
        Under FSDP2 a projected weight's gradient shards are gathered first (every process then
        holds the same whole gradient, computes the same projection and update, and keeps its own
        rows of the update; lorabench.distributed.whole_gradient), so the projection is of the
        whole matrix as in a one-process run."""
        projected = group["projector"] is not None and p.ndim == 2
        decay = group["lr"] * group["weight_decay"]
        if decay > 0 and group["decay_first"]:
            p.mul_(1.0 - decay)
        grad, sharded = whole_gradient(p) if projected else (p.grad, False)
        update = self._update(p, grad, group, index, projected)
        if sharded:
            update = local_part(update, p)
        p.add_(update.to(p.dtype))
        if decay > 0 and not group["decay_first"]:
            p.add_(p, alpha=-decay)

    def enable_layerwise(self) -> None:
        """Per-layer weight updates (GaLore, Zhao et al. 2024, §4.3, after LOMO): a hook updates each
        parameter the moment the backward pass has accumulated its gradient, then frees that gradient,
        so the gradients of the whole model are never held at once (for SmolLM2-135M 0.54 GB of fp32
        gradients). The update rule is unchanged. Ruled out with it, because they need every gradient
        before any update: accumulation over micro-batches, global gradient-norm clipping, skipping a
        non-finite step and multi-process runs (lorabench.method_params.check.check_run_fit refuses them)."""
        self._position = {}
        for group_index, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                self._position[id(p)] = (group_index, index)
                p.register_post_accumulate_grad_hook(self._update_now)

    @torch.no_grad()
    def _update_now(self, p) -> None:
        group_index, index = self._position[id(p)]  # groups are looked up now: load_state_dict replaces them
        self._step_param(p, self.param_groups[group_index], index)
        p.grad = None

    def _update(self, p, grad: torch.Tensor, group, index, projected: bool) -> torch.Tensor:
        """The full-shape update (already multiplied by -step size) for one parameter from its
        gradient ``grad`` (the whole matrix for a projected one)."""
        state = self.state[p]
        grad = grad.float() if projected else grad
        step = state.setdefault("step", 0)
        low = grad
        if projected:
            if "projector" not in state:
                state["projector"] = self._projector(p, group, index)
            proj = state["projector"]
            if proj.due(step):
                proj.refresh(grad, step)
                if group["reset_on_refresh"]:
                    self._reset_moments(state)
            low = proj.project(grad)
        state["step"] = step + 1
        normed, step_size = self._adam_direction(state, low, group)
        if not projected:
            return normed.mul_(-step_size)
        step_size *= group["proj_lr_scale"]
        update = proj.project_back(normed).mul_(group["scale"])
        rule = group["residual"]
        if rule == "none":
            return update.mul_(-step_size)
        back = proj.project_back(low)
        residual = grad - (back * group["scale"] if group["fira_residual"] == "package" else back)
        if rule == "fira":
            update.add_(self._fira_residual(residual, normed, low, proj.side, state, group["gamma"]))
            return update.mul_(-step_size)
        lr_free = group["lr"] * group["proj_lr_scale"] * group["residual_lr_scale"]
        free = residual.sign() if rule == "sign_sgd" else residual
        return update.mul_(-step_size).add_(free, alpha=-lr_free)

    def _reset_moments(self, state: dict) -> None:
        """Zero the moments and restart their bias correction (the subspace changed); a no-op before
        the first step. Subclasses that store the moments under other keys override this too."""
        if "exp_avg" in state:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["adam_step"] = 0

    def _adam_direction(self, state: dict, low: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        """Update the moments with ``low``; returns (m / denom, step size): denom = sqrt(v) + eps with
        step lr·sqrt(1-β2^t)/(1-β1^t), or with ``eps_after_correction`` denom = sqrt(v)/sqrt(1-β2^t)
        + eps with step lr/(1-β1^t). Subclasses that store the moments differently (e.g. 8-bit)
        override this one method."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
            state["adam_step"] = 0
        state["adam_step"] += 1
        t = state["adam_step"]
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        correction1, correction2 = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
        if group["eps_after_correction"]:
            normed = exp_avg / exp_avg_sq.sqrt().div_(correction2).add_(group["eps"])
            return normed, group["lr"] / correction1
        normed = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        return normed, group["lr"] * correction2 / correction1

    @staticmethod
    def _fira_residual(residual, normed, low, side, state, gamma):
        """φ⊙S with φ = ‖Adam(R)‖/‖R‖ along the rank dimension, then the norm-growth limiter."""
        rank_dim = 0 if side == "left" else 1
        phi = normed.norm(dim=rank_dim) / (low.norm(dim=rank_dim) + 1e-8)
        scaled = residual * (phi.unsqueeze(0) if side == "left" else phi.unsqueeze(1))
        norm = scaled.norm()
        if "residual_norm" in state:
            limiter = torch.clamp(norm / (state["residual_norm"] + 1e-8), min=gamma) / gamma
            scaled.div_(limiter)
            norm = norm / limiter
        state["residual_norm"] = norm
        return scaled


# ----------------------------------------------------------------------------- builders


def build_family(model, ctx: MethodContext, params, cls: type | None = None, **options) -> GaLoreFamily:
    """Targeted 2-D weights in one projected group (as galore_torch.py selects them); every other
    trainable parameter in plain AdamW groups (no decay on 1-D tensors)."""
    projected = [p for _, p in target_linear_weights(model, ctx.target_modules) if p.requires_grad]
    groups = decay_groups(model, ctx.weight_decay, exclude={id(p) for p in projected})
    if projected:
        options.setdefault("update_proj_gap", getattr(params, "update_proj_gap", None))
        groups.append(
            {
                "params": projected,
                "weight_decay": ctx.weight_decay,
                "seed": ctx.seed,
                "proj_type": params.proj_type,
                **options,
            }
        )
    return (cls or GaLoreFamily)(groups, lr=ctx.lr, betas=(params.beta1, params.beta2), eps=params.eps)


@OPTIMIZERS.register("galore")
class GaLore(OptimizerBuilder):
    Params = GaLoreParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Zhao et al., 2024, arXiv:2403.03507"
    backed_by = "lorabench"
    fidelity = Fidelity(
        reference="pip galore-torch==1.0 (GaLoreAdamW; = jiaweizzhao/GaLore)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 steps (seen <= 1.5e-8)",
        fixture="tests/fixtures/parity/galore.json",
        unchecked=(
            "projector randomized_svd and random: lorabench additions, galore-torch projects by SVD only",
            "proj_type other than std (reverse_std, left, right): not pinned; galore-torch's 'full' is not offered",
            "non-fp32 weights: the parity problem is fp32",
        ),
    )

    def build(self, model, params: GaLoreParams, ctx: MethodContext):
        optimizer = build_family(model, ctx, params, projector=params.projector, rank=params.rank, scale=params.scale)
        if params.layerwise:
            optimizer.enable_layerwise()
        return optimizer


@OPTIMIZERS.register("fira")
class Fira(OptimizerBuilder):
    Params = FiraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Chen et al., 2024, arXiv:2410.01623"
    backed_by = "lorabench"
    fidelity = Fidelity(
        reference="pip fira==1.0.2 (FiraAdamW; = xichen-fy/Fira optimizer_torch/)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 steps (seen <= 3e-8)",
        fixture="tests/fixtures/parity/fira.json",
        revision=2,  # the residual follows the authors' code (S = G - scale·P R)
        unchecked=(
            "fira_residual: exact (the paper's S = G - P R): no released code uses it",
            "gamma other than 1.01: the package fixes the limiter at 1.01",
            "proj_type other than std; non-fp32 weights (the parity problem is fp32)",
        ),
    )

    def build(self, model, params: FiraParams, ctx: MethodContext):
        return build_family(
            model,
            ctx,
            params,
            projector="svd",
            rank=params.rank,
            scale=params.scale,
            residual="fira",
            gamma=params.gamma,
            fira_residual=params.fira_residual,
        )


class FrugalFamily(GaLoreFamily):
    """FRUGAL's AdamW rules on every group (eps after the bias correction, decay before the update);
    its rank comes from density per matrix: r = max(1, round(density·d)), d = the projected side."""

    rule_defaults = {"eps_after_correction": True, "decay_first": True}

    def _projector(self, p, group, index):
        d = p.shape[0] if SIDE_RULES[group["proj_type"]](*p.shape) == "left" else p.shape[1]
        group = {**group, "rank": max(1, round(group["density"] * d))}
        return super()._projector(p, group, index)


@OPTIMIZERS.register("frugal")
class Frugal(OptimizerBuilder):
    Params = FrugalParams
    size_knob = "density"  # what a size budget sets (lorabench/budget.py)
    paper = "Zmushko et al., 2025, arXiv:2411.07837"
    backed_by = "lorabench"
    fidelity = Fidelity(
        reference="fzmushko/FRUGAL@c7ebe4c242f7 frugal/adamw.py (GaloreAdamW, proj_optimizer_templates.py)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 steps (seen <= 3e-8)",
        fixture="tests/fixtures/parity/frugal.json",
        revision=2,  # eps after bias correction, weight decay before the update
        deviations=(
            "rank is max(1, round(density·d)): the authors' round(density·d) gives an empty subspace when "
            "density·d <= 0.5",
            "the preset runs the SVD projector (GaloreAdamW) at density 0.25 on every target, the variant "
            "comparable with GaLore and Fira; the authors' GLUE scripts run CoordAdamW (random columns) at "
            "density = rank / 768",
        ),
        unchecked=(
            "projector random: the authors draw torch.nn.init.orthogonal_ from the global RNG, lorabench a "
            "seeded QR; the streams differ",
            "projector randk: the authors' CoordAdamW takes int(density·n) random columns, lorabench round("
            "density·d) rows or columns on the projected side, from its own seeded generator",
            "projector blocks: the authors' BlockAdamW activates whole tensors, lorabench contiguous "
            "row/column blocks of each matrix",
            "proj_type other than std; non-fp32 weights (the parity problem is fp32)",
        ),
    )

    def build(self, model, params: FrugalParams, ctx: MethodContext):
        return build_family(
            model,
            ctx,
            params,
            cls=FrugalFamily,
            projector=params.projector,
            density=params.density,
            update_proj_gap=params.update_gap,
            scale=1.0,
            residual=params.inactive_update_rule,
            residual_lr_scale=params.inactive_lr_scale,
            reset_on_refresh=params.reset_statistics,
            proj_lr_scale=params.proj_params_lr_scale,  # both parts; the decay keeps the group's lr
        )
