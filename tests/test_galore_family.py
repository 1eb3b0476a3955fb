"""The GaLore family (galore_family.py, projectors.py): parity with galore-torch and pip fira,
the FRUGAL split, the DCT basis, analytic optimizer-state bytes, and
one-step hand computations of the Fira and FRUGAL update rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.measure import optimizer_state_bytes
from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers import galore_family as gf
from lorabench.methods.optimizers import galore_torch
from lorabench.methods.optimizers.dct_adamw import dct_matrix
from lorabench.methods.optimizers.projectors import make_projector
from lorabench.registry import OPTIMIZERS

LR, WD = 1e-2, 0.01


def stack(seed: int = 0) -> nn.Sequential:
    """Three projected weights: 24x16 (right side, d=16), 16x24 (left, d=16), 10x16 (left, d=10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 10))


def ctx(**kw) -> MethodContext:
    base = {
        "target_modules": ["0", "2", "4"],
        "head": "classification",
        "lr": LR,
        "weight_decay": WD,
        "max_steps": 10,
        "seed": 0,
    }
    return MethodContext(**{**base, **kw})


def build(name: str, model: nn.Module, c: MethodContext | None = None, **params):
    builder = OPTIMIZERS.get(name)()
    return builder.build(model, builder.Params(**params), c or ctx())


def run_same_grads(models_opts, steps: int, seed: int = 1) -> None:
    """Feed every (model, optimizer) pair the same random gradients for ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in models_opts[0][0].parameters()]
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for model, opt in models_opts:
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol, rtol=0), f"{name}: max diff {(p - q).abs().max():.2e}"


# (1) parity with the authors' package --------------------------------------------------------


def test_galore_matches_galore_torch():
    ours, ref = stack(), stack()
    params = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}
    opt = build("galore", ours, **params)
    ref_opt = galore_torch.GaLoreTorch().build(ref, galore_torch.GaLoreParams(**params), ctx())
    run_same_grads([(ours, opt), (ref, ref_opt)], steps=7)  # refreshes at steps 0, 3 and 6
    assert_same_weights(ours, ref)
    assert not torch.allclose(ours[0].weight, stack()[0].weight)  # it did train


# (2) Fira against pip fira 1.0.2 --------------------------------------------------------------


@pytest.mark.parametrize("scale,form", [(1.0, "exact"), (0.25, "package")])
def test_fira_matches_fira_package(scale, form):
    fira = pytest.importorskip("fira")
    ours, ref = stack(), stack()
    opt = build("fira", ours, rank=4, update_proj_gap=3, scale=scale, fira_residual=form)
    proj = [ref[0].weight, ref[2].weight, ref[4].weight]
    rest = [p for p in ref.parameters() if all(p is not q for q in proj)]
    groups = [
        {"params": rest, "weight_decay": 0.0},
        {"params": proj, "rank": 4, "update_proj_gap": 3, "alpha": scale, "proj_type": "std", "weight_decay": WD},
    ]
    ref_opt = fira.FiraAdamW(groups, lr=LR, no_deprecation_warning=True)
    run_same_grads([(ours, opt), (ref, ref_opt)], steps=7)
    assert_same_weights(ours, ref)


# (3) FRUGAL: subspace part + residual = gradient, residual orthogonal to the subspace ----------


@pytest.mark.parametrize("name", ["svd", "randomized_svd", "random", "randk", "blocks", "dct"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_split_sums_to_gradient(name, shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    proj = make_projector(name, shape, 4, 10, seed=5)
    proj.refresh(grad, 0)
    low = proj.project(grad)
    assert low.shape == ((4, 20) if shape == (12, 20) else (20, 4))
    sub = proj.project_back(low)
    residual = grad - sub
    assert torch.allclose(sub + residual, grad, atol=1e-6, rtol=0)
    assert proj.project(residual).abs().max() < 1e-5  # nothing of the residual is left in the subspace
    if name in ("randk", "blocks"):
        assert torch.equal(sub + residual, grad) and not (sub.ne(0) & residual.ne(0)).any()


def test_blocks_move_and_randk_is_seeded():
    grad = torch.randn(8, 20)
    blocks = make_projector("blocks", grad.shape, 3, 10)
    seen = []
    for step in range(3):
        blocks.refresh(grad, step)
        seen.append(blocks.indices.tolist())
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7, 0]]
    a, b = (make_projector("randk", grad.shape, 3, 10, seed=7) for _ in range(2))
    a.refresh(grad, 4), b.refresh(grad, 4)
    assert torch.equal(a.indices, b.indices)


# (4) DCT basis ---------------------------------------------------------------------------------


def test_dct_basis_orthonormal_and_top_r():
    scipy_fft = pytest.importorskip("scipy.fft")
    q = dct_matrix(12)
    assert torch.allclose(q.T @ q, torch.eye(12), atol=1e-5)
    ref = torch.tensor(scipy_fft.dct(torch.eye(12).numpy(), type=2, norm="ortho", axis=0)).float()
    assert torch.allclose(q, ref, atol=1e-6)  # the DCT-II matrix itself; its columns are the candidates
    for shape in [(20, 12), (12, 20), (12, 12)]:  # right side (m >= n, square too): G Q; left: Qᵀ G
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        proj = make_projector("dct", shape, 4, 10)
        assert proj.side == ("left" if shape[0] < shape[1] else "right")
        proj.refresh(grad, 0)
        g = grad if proj.side == "right" else grad.T
        scores = torch.stack([(g @ q[:, j]).abs().sum() for j in range(12)])  # l1 norms
        assert set(proj.indices.tolist()) == set(scores.topk(4).indices.tolist())
        assert torch.allclose(proj.basis(), q[:, proj.indices].T)


def test_dct_refresh_schedule_and_max_shape():
    proj, grad, due = make_projector("dct", (20, 12), 4, 5), torch.randn(20, 12), []
    for step in range(12):
        if proj.due(step):
            due.append(step)
            proj.refresh(grad, step)
    assert due == [0, 4, 9]  # 1-based steps 1, 5 and 10: the authors' ``steps == 1 or steps % gap == 0``
    model = stack()
    opt = build("dct_adamw", model, rank=4, max_shape=20)
    run_same_grads([(model, opt)], steps=2)
    assert "projector" not in opt.state[model[0].weight]  # 24x16: a dimension >= 20, full AdamW
    assert opt.state[model[0].weight]["exp_avg"].shape == (24, 16)
    assert opt.state[model[4].weight]["exp_avg"].shape == (4, 16)


# (5) optimizer-state bytes against analytic formulas --------------------------------------------

MATS = [(24, 16), (16, 24), (10, 16)]  # projected weights of stack()
BIAS_BYTES = 2 * 4 * (24 + 16 + 10)  # two fp32 moments per bias element


def moments(r: int, m: int, n: int) -> int:
    return 2 * 4 * r * max(m, n)


def measured(name: str, steps: int = 1, **params) -> int:
    model = stack()
    opt = build(name, model, **params)
    run_same_grads([(model, opt)], steps=steps)
    return optimizer_state_bytes(opt)


def test_state_bytes_galore_fira():
    galore = BIAS_BYTES + sum(moments(4, m, n) + 4 * 4 * min(m, n) for m, n in MATS)
    assert measured("galore", rank=4) == galore
    assert measured("fira", steps=2, rank=4) == galore + 4 * len(MATS)  # + one fp32 norm per matrix


def test_state_bytes_dct():  # Q-GaLore's: tests/test_q_galore.py
    dct = BIAS_BYTES + sum(moments(4, m, n) + 8 * 4 for m, n in MATS) + 4 * (16 * 16 + 10 * 10)
    assert measured("dct_adamw", rank=4) == dct  # the 16x16 DCT matrix is shared by two weights


@pytest.mark.parametrize("projector", ["svd", "randk"])
def test_state_bytes_frugal(projector):
    ranks = [round(0.25 * min(m, n)) for m, n in MATS]  # 4, 4, 2 (round half to even)
    proj = [4 * r * min(m, n) if projector == "svd" else 8 * r for r, (m, n) in zip(ranks, MATS)]
    expected = BIAS_BYTES + sum(moments(r, m, n) for r, (m, n) in zip(ranks, MATS)) + sum(proj)
    assert measured("frugal", projector=projector) == expected


# (6) one step by hand ---------------------------------------------------------------------------


def one_matrix(shape, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    return model, model[0].weight


@pytest.mark.parametrize("form", ["package", "exact"])
@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (12, 12)])
def test_fira_update_by_hand(shape, form):
    """package (the default, pip fira): S = G - scale·P R; exact (the paper): S = G - P R."""
    model, w = one_matrix(shape)
    w0 = w.detach().clone()
    c = ctx(target_modules=["0"], weight_decay=0.0)
    opt = build("fira", model, c, rank=3, scale=0.5, gamma=1.01, fira_residual=form)
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(shape, generator=gen)
    g2 = 5 * torch.randn(shape, generator=gen)  # a much larger residual: the limiter must act
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    u, _, vh = torch.linalg.svd(g1, full_matrices=False)
    left = shape[0] < shape[1]  # square matrices project on the right, as galore-torch and fira
    P = u[:, :3] if left else vh[:3].T  # P: d x r, orthonormal columns
    proj = (lambda g: P.T @ g) if left else (lambda g: g @ P)
    back = (lambda r: P @ r) if left else (lambda r: r @ P.T)
    b1, b2, eps = 0.9, 0.999, 1e-6
    w_hand, m, v, prev = w0.clone(), 0, 0, None
    for t, g in enumerate((g1, g2), start=1):
        R = proj(g)
        m, v = b1 * m + (1 - b1) * R, b2 * v + (1 - b2) * R**2
        N = m / (v.sqrt() + eps)
        axis = 0 if left else 1
        phi = N.norm(dim=axis, keepdim=True) / (R.norm(dim=axis, keepdim=True) + 1e-8)
        S = (g - (0.5 if form == "package" else 1.0) * back(R)) * phi
        if prev is not None and S.norm() > 1.01 * prev:
            S = S * (1.01 * prev / S.norm())
        prev = S.norm()
        step = LR * math.sqrt(1 - b2**t) / (1 - b1**t)
        w_hand = w_hand - step * (0.5 * back(N) + S)
    assert torch.allclose(w, w_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
def test_frugal_update_by_hand(rule):
    """FRUGAL's AdamW: W *= 1 - lr·wd first (the group's lr), then both parts at lr·proj_params_lr_scale;
    after one step denom = sqrt(v)/sqrt(1-β2) + eps = |R| + eps and the step size is lr/(1-β1)."""
    model, w = one_matrix((8, 32))
    w0 = w.detach().clone()
    opt = build(
        "frugal",
        model,
        ctx(target_modules=["0"], weight_decay=0.1),
        density=0.25,
        inactive_update_rule=rule,
        inactive_lr_scale=0.1,
        proj_params_lr_scale=0.5,
    )
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    w.grad = g.clone()
    opt.step()
    P = torch.linalg.svd(g, full_matrices=False)[0][:, :2]  # d = 8, rank round(0.25 * 8) = 2
    R = P.T @ g
    S = g - P @ R
    free = S.sign() if rule == "sign_sgd" else S
    w_hand = w0 * (1 - LR * 0.1) - LR * 0.5 * (P @ (R / (R.abs() + 1e-8))) - LR * 0.5 * 0.1 * free
    assert torch.allclose(w, w_hand, atol=1e-6, rtol=0)
    assert opt.state[w]["exp_avg"].shape == (2, 32)


def test_frugal_resets_moments_on_refresh_and_square_weights_project_right():
    model, w = one_matrix((12, 12))
    opt = build("frugal", model, ctx(target_modules=["0"], weight_decay=0.0), density=0.25, update_gap=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # the subspace is refreshed before the third step
        w.grad = torch.randn(12, 12, generator=gen)
        opt.step()
    state = opt.state[w]
    assert state["projector"].side == "right" and state["exp_avg"].shape == (12, 3)
    assert state["adam_step"] == 1  # restarted at the refresh
    R = w.grad @ state["projector"].basis().T
    assert torch.allclose(state["exp_avg"], 0.1 * R, atol=1e-7, rtol=0)


def test_params_validate_with_clear_messages():
    with pytest.raises(ConfigError, match="density=0"):
        gf.FrugalParams(density=0)
    with pytest.raises(ConfigError, match="gamma=0.9"):
        gf.FiraParams(gamma=0.9)
    with pytest.raises(ConfigError, match="projector='dct'"):
        gf.FrugalParams(projector="dct")
