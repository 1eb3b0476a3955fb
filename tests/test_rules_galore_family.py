"""Rules of the GaLore family (galore_family.py, galore_torch.py) that the parity cases leave open:
hyper-parameter validation names the key and value and accepts every documented choice, Fira's
residual always steps against the gradient and its norm-growth limiter holds from a zero residual,
FRUGAL's rank is at least 1, the builders pass their settings, and galore-torch is built without
its deprecation warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers import galore_torch
from lorabench.methods.optimizers.galore_family import (
    Fira,
    FiraParams,
    FrugalFamily,
    FrugalParams,
    GaLoreFamily,
    GaLoreParams,
    ProjectedAdamParams,
)

INVALID = [
    (ProjectedAdamParams, {"rank": 0}, "method.rank=0 is invalid; it must be > 0"),
    (ProjectedAdamParams, {"update_proj_gap": 0}, "method.update_proj_gap=0 is invalid; it must be > 0"),
    (ProjectedAdamParams, {"scale": -1.0}, "method.scale=-1.0 is invalid; it must be > 0"),
    (
        ProjectedAdamParams,
        {"proj_type": "full"},
        "method.proj_type='full' is invalid; valid choices: std, reverse_std, left, right",
    ),
    (ProjectedAdamParams, {"beta1": 1.0}, "method.beta1=1.0 is invalid; it must be in [0, 1)"),
    (ProjectedAdamParams, {"beta2": -0.1}, "method.beta2=-0.1 is invalid; it must be in [0, 1)"),
    (ProjectedAdamParams, {"eps": 0.0}, "method.eps=0.0 is invalid; it must be > 0"),
    (GaLoreParams, {"projector": "qr"}, "method.projector='qr' is invalid; valid choices: svd, randomized_svd, random"),
    (FiraParams, {"gamma": 0.99}, "method.gamma=0.99 is invalid; the norm-growth limit must be >= 1"),
    (FiraParams, {"fira_residual": "paper"}, "method.fira_residual='paper' is invalid; valid choices: package, exact"),
    (FrugalParams, {"density": 0.0}, "method.density=0.0 is invalid; it must be in (0, 1]"),
    (FrugalParams, {"density": 1.5}, "method.density=1.5 is invalid; it must be in (0, 1]"),
    (FrugalParams, {"update_gap": 0}, "method.update_gap=0 is invalid; it must be > 0"),
    (
        FrugalParams,
        {"projector": "randomized_svd"},
        "method.projector='randomized_svd' is invalid; valid choices: svd, random, randk, blocks",
    ),
    (
        FrugalParams,
        {"inactive_update_rule": "adam"},
        "method.inactive_update_rule='adam' is invalid; valid choices: sign_sgd, sgd, none",
    ),
    (FrugalParams, {"inactive_lr_scale": -0.1}, "method.inactive_lr_scale=-0.1 is invalid; it must be >= 0"),
    (FrugalParams, {"proj_params_lr_scale": 0.0}, "method.proj_params_lr_scale=0.0 is invalid; it must be > 0"),
    (
        FrugalParams,
        {"proj_type": "full"},
        "method.proj_type='full' is invalid; valid choices: std, reverse_std, left, right",
    ),
    (FrugalParams, {"eps": -1e-8}, "method.eps=-1e-08 is invalid; it must be > 0"),
    (galore_torch.GaLoreParams, {"rank": 0}, "method.rank=0 is invalid; it must be > 0"),
    (galore_torch.GaLoreParams, {"update_proj_gap": -2}, "method.update_proj_gap=-2 is invalid; it must be > 0"),
    (galore_torch.GaLoreParams, {"scale": 0.0}, "method.scale=0.0 is invalid; it must be > 0"),
    (
        galore_torch.GaLoreParams,
        {"proj_type": "up"},
        "method.proj_type='up' is invalid; valid choices: std, reverse_std, left, right, full",
    ),
]


@pytest.mark.parametrize("cls,params,message", INVALID)
def test_invalid_hyper_parameters_name_the_key_and_value(cls, params, message):
    with pytest.raises(ConfigError) as err:
        cls(**params)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "cls,params",
    [
        (GaLoreParams, {"projector": "svd"}),
        (GaLoreParams, {"projector": "randomized_svd"}),
        (GaLoreParams, {"projector": "random"}),
        (FiraParams, {"gamma": 1.0}),  # no growth at all is a valid limit
        (FiraParams, {"fira_residual": "exact"}),
        (FrugalParams, {"density": 1.0}),
        (FrugalParams, {"projector": "random"}),
        (FrugalParams, {"projector": "randk"}),
        (FrugalParams, {"projector": "blocks"}),
        (FrugalParams, {"inactive_update_rule": "sgd"}),
        (FrugalParams, {"inactive_update_rule": "none"}),
        (FrugalParams, {"inactive_lr_scale": 0.0}),  # FRUGAL with a frozen residual
    ],
)
def test_documented_choices_are_accepted(cls, params):
    built = cls(**params)
    assert all(getattr(built, k) == v for k, v in params.items())


# ----------------------------------------------------------------------------- Fira


def fira(weight: nn.Parameter, **group) -> GaLoreFamily:
    options = {"projector": "svd", "rank": 2, "update_proj_gap": 100, "scale": 0.25, "residual": "fira"}
    return GaLoreFamily([{"params": [weight], **options, **group}], lr=0.1)


def first_gradient() -> torch.Tensor:
    """Columns 0 and 1 only: the SVD basis (right side, 6 x 4) is exactly e0, e1."""
    g = torch.zeros(6, 4)
    g[0, 0], g[1, 1] = 2.0, 1.0
    return g


def test_fira_residual_steps_against_the_gradient_where_the_subspace_sees_nothing():
    """Row 0 of the second gradient lies outside the basis (R's row 0 is exactly 0) while Adam's state
    of that row is not: phi is ||Adam(R)_0|| / (0 + 1e-8) > 0, so W[0, 2:] moves against G[0, 2:]."""
    w = nn.Parameter(torch.zeros(6, 4))
    opt = fira(w)
    w.grad = first_gradient()
    opt.step()
    before = w.detach().clone()
    g = torch.zeros(6, 4)
    g[0, 2], g[0, 3] = 3.0, 4.0
    w.grad = g
    opt.step()
    moved = w.detach()[0, 2:] - before[0, 2:]
    assert torch.all(moved < 0)
    torch.testing.assert_close(w.detach()[:, 2:][1:], before[:, 2:][1:], rtol=0, atol=0)


def test_fira_limiter_holds_the_residual_after_a_zero_one():
    """With the paper's residual S = G - P R the first gradient (inside the basis) leaves S_0 = 0, so
    ||S_1|| <= gamma ||S_0|| keeps the next residual step at (numerically) zero."""
    w = nn.Parameter(torch.zeros(6, 4))
    opt = fira(w, fira_residual="exact")
    w.grad = first_gradient()
    opt.step()
    assert float(opt.state[w]["residual_norm"]) == 0.0
    before = w.detach().clone()
    g = torch.zeros(6, 4)
    g[0, 0], g[0, 2] = 1.0, 1.0  # R row 0 is not zero, S row 0 = (0, 0, 1, 0)
    w.grad = g
    opt.step()
    assert abs(float(w.detach()[0, 2] - before[0, 2])) < 1e-8
    assert float(w.detach()[0, 0] - before[0, 0]) < -1e-3  # the projected part still moves


def test_fira_builder_passes_gamma():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    ctx = MethodContext(["0"], "classification", lr=0.1, weight_decay=0.0, max_steps=10, seed=0)
    opt = Fira().build(model, FiraParams(rank=2, gamma=1.5, fira_residual="exact"), ctx)
    projected = [g for g in opt.param_groups if g["projector"] is not None]
    assert len(projected) == 1 and projected[0]["gamma"] == 1.5 and projected[0]["fira_residual"] == "exact"


# ----------------------------------------------------------------------------- FRUGAL and galore-torch


def test_frugal_rank_is_at_least_one():
    w = nn.Parameter(torch.zeros(16, 24))  # left side, d = 16: round(0.01 * 16) = 0
    opt = FrugalFamily([{"params": [w], "projector": "svd", "density": 0.01, "residual": "sign_sgd"}], lr=0.1)
    w.grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state[w]["projector"].rank == 1 and opt.state[w]["exp_avg"].shape == (1, 24)


def test_galore_torch_builds_without_its_deprecation_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    ctx = MethodContext(["0"], "classification", lr=0.1, weight_decay=0.0, max_steps=10, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        galore_torch.GaLoreTorch().build(model, galore_torch.GaLoreParams(rank=2), ctx)


# ----------------------------------------------------------------------------- GaLoreFamily's defaults


def same_steps(opts_params, steps: int, shape, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        g = torch.randn(*shape, generator=gen)
        for opt, w in opts_params:
            w.grad = g.clone()
            opt.step()


def weight(shape=(12, 10)) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))


def test_defaults_are_galore_torchs_adamw_at_rank_8_gap_200_scale_1():
    """lr 1e-3, eps 1e-6, no decay, rank 8, a refresh every 200 steps (the 201st step refreshes)."""
    from galore_torch import GaLoreAdamW

    ours, ref = weight(), weight()
    opt = GaLoreFamily([{"params": [ours], "projector": "svd"}])
    group = {"params": [ref], "rank": 8, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
    ref_opt = GaLoreAdamW([group], no_deprecation_warning=True)
    same_steps([(opt, ours), (ref_opt, ref)], 202, ours.shape)
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-6, rtol=0)
    assert opt.state[ours]["projector"].refreshes == 2


@pytest.mark.parametrize(
    "residual,explicit",
    [
        ("fira", {"gamma": 1.01, "fira_residual": "package"}),
        ("sign_sgd", {"residual_lr_scale": 1.0}),
    ],
)
def test_residual_defaults_are_the_documented_ones(residual, explicit):
    base = {"projector": "svd", "rank": 2, "update_proj_gap": 3, "scale": 0.25, "residual": residual}
    implicit_w, explicit_w = weight(), weight()
    implicit = GaLoreFamily([{"params": [implicit_w], **base}], lr=0.05)
    given = GaLoreFamily([{"params": [explicit_w], **base, **explicit}], lr=0.05)
    grow = torch.Generator().manual_seed(4)
    for step in range(8):  # growing gradients: the limiter acts
        g = torch.randn(12, 10, generator=grow) * (1.5**step)
        for opt, w in ((implicit, implicit_w), (given, explicit_w)):
            w.grad = g.clone()
            opt.step()
    assert torch.equal(implicit_w.detach(), explicit_w.detach())


def test_default_seed_is_zero_and_each_weight_of_a_group_gets_its_own_stream():
    a, b = weight(), weight()
    implicit = GaLoreFamily([{"params": [a, b], "projector": "random", "rank": 2}])
    c, d = weight(), weight()
    given = GaLoreFamily([{"params": [c, d], "projector": "random", "rank": 2, "seed": 0}])
    for w in (a, b, c, d):
        w.grad = torch.ones_like(w)
    implicit.step()
    given.step()
    basis = {name: opt.state[w]["projector"].basis() for name, opt, w in (("a", implicit, a), ("b", implicit, b))}
    assert torch.equal(basis["a"], given.state[c]["projector"].basis())
    assert torch.equal(basis["b"], given.state[d]["projector"].basis())
    assert not torch.allclose(basis["a"], basis["b"])
    other = weight()
    seeded = GaLoreFamily([{"params": [other], "projector": "random", "rank": 2, "seed": 1}])
    other.grad = torch.ones_like(other)
    seeded.step()
    assert not torch.allclose(seeded.state[other]["projector"].basis(), basis["a"])


def test_the_groups_side_rule_reaches_the_projector():
    w = weight((12, 10))  # std: right; "left" must win
    opt = GaLoreFamily([{"params": [w], "projector": "svd", "rank": 2, "proj_type": "left"}])
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.state[w]["projector"].side == "left"


def test_an_unknown_residual_rule_is_refused_with_the_valid_ones():
    w = weight()
    opt = GaLoreFamily([{"params": [w], "projector": "svd", "residual": "adam"}])
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError) as err:
        opt.step()
    assert str(err.value) == "residual='adam' is invalid; valid: none, fira, sign_sgd, sgd"


def test_a_checkpoint_without_a_newer_group_option_gets_its_default():
    w = weight()
    opt = GaLoreFamily([{"params": [w], "projector": "svd", "rank": 2}], lr=0.01)
    w.grad = torch.ones_like(w)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as from disk: no tensor shared with the running optimizer
    for group in saved["param_groups"]:
        del group["proj_lr_scale"], group["eps_after_correction"]
    fresh_w = nn.Parameter(w.detach().clone())
    fresh = GaLoreFamily([{"params": [fresh_w], "projector": "svd", "rank": 2}], lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["proj_lr_scale"] == 1.0 and fresh.param_groups[0]["eps_after_correction"] is False
    assert None not in fresh.param_groups[0]
    fresh_w.grad, w.grad = torch.ones_like(w), torch.ones_like(w)
    fresh.step()
    opt.step()
    assert torch.equal(fresh_w.detach(), w.detach())


def test_bf16_weights_project_in_fp32_and_plain_ones_keep_bf16_moments():
    torch.manual_seed(0)
    projected = nn.Parameter(torch.randn(12, 10).bfloat16())
    plain = nn.Parameter(torch.randn(10).bfloat16())
    opt = GaLoreFamily([{"params": [projected], "projector": "svd", "rank": 2}, {"params": [plain]}], lr=0.01)
    projected.grad, plain.grad = torch.randn(12, 10).bfloat16(), torch.randn(10).bfloat16()
    opt.step()
    assert opt.state[projected]["exp_avg"].dtype == torch.float32 and projected.dtype == torch.bfloat16
    assert opt.state[plain]["exp_avg"].dtype == torch.bfloat16


def test_beta_zero_is_accepted():
    assert ProjectedAdamParams(beta1=0.0).beta1 == 0.0


def test_builders_pass_betas_side_rule_and_seed():
    from lorabench.methods.optimizers.adamw import AdamW, AdamWParams
    from lorabench.methods.optimizers.galore_family import GaLore

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12))
    ctx = MethodContext(["0"], "classification", lr=0.1, weight_decay=0.0, max_steps=10, seed=3)
    opt = GaLore().build(model, GaLoreParams(rank=2, proj_type="left", beta1=0.5, beta2=0.6), ctx)
    projected = [g for g in opt.param_groups if g["projector"] is not None][0]
    assert projected["proj_type"] == "left" and projected["seed"] == 3
    assert all(g["betas"] == (0.5, 0.6) for g in opt.param_groups)
    plain = AdamW().build(model, AdamWParams(beta1=0.5, beta2=0.6, eps=1e-3), ctx)
    assert all(g["betas"] == (0.5, 0.6) and g["eps"] == 1e-3 for g in plain.param_groups)
