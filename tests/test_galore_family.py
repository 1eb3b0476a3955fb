"""The GaLore family (galore_family.py, projectors.py): parity with galore-torch and pip fira,
the FRUGAL split, the DCT basis, analytic optimizer-state bytes, Q-GaLore's lazy refresh, and
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
from lorabench.methods.optimizers.projectors import dct_matrix, dequantize_rows, make_projector, quantize_rows
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
    assert torch.allclose(q, ref.T, atol=1e-5)  # columns are the DCT-II basis vectors
    for shape in [(20, 12), (12, 20)]:  # right side: columns of G; left side: rows
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        proj = make_projector("dct", shape, 4, 10)
        proj.refresh(grad, 0)
        g = grad if shape[0] >= shape[1] else grad.T
        scores = torch.stack([(g @ q[:, j]).norm() for j in range(12)])
        assert set(proj.indices.tolist()) == set(scores.topk(4).indices.tolist())
        assert torch.allclose(proj.basis(), q[:, proj.indices].T)


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


def test_state_bytes_dct_q_galore():
    dct = BIAS_BYTES + sum(moments(4, m, n) + 8 * 4 for m, n in MATS) + 4 * (16 * 16 + 10 * 10)
    assert measured("dct_adamw", rank=4) == dct  # the 16x16 DCT matrix is shared by two weights
    q4 = BIAS_BYTES + sum(moments(4, m, n) + math.ceil(4 * min(m, n) / 2) + 4 * 4 for m, n in MATS)
    assert measured("q_galore", rank=4) == q4


@pytest.mark.parametrize("projector", ["svd", "randk"])
def test_state_bytes_frugal(projector):
    ranks = [round(0.25 * min(m, n)) for m, n in MATS]  # 4, 4, 2 (round half to even)
    proj = [4 * r * min(m, n) if projector == "svd" else 8 * r for r, (m, n) in zip(ranks, MATS)]
    expected = BIAS_BYTES + sum(moments(r, m, n) for r, (m, n) in zip(ranks, MATS)) + sum(proj)
    assert measured("frugal", projector=projector) == expected


def test_int4_round_trip():
    basis = torch.linalg.qr(torch.randn(30, 5))[0].T.contiguous()
    codes, scale = quantize_rows(basis, 4)
    assert codes.dtype == torch.uint8 and codes.numel() == 75 and scale.shape == (5, 1)
    back = dequantize_rows(codes, scale, 4, basis.shape)
    assert (back - basis).abs().max() <= scale.max() / 2 + 1e-7


# (6) Q-GaLore's lazy refresh -------------------------------------------------------------------


def lazy_refreshes(grads, threshold: float) -> int:
    w = nn.Parameter(torch.zeros(16, 32))
    opt = gf.GaLoreFamily(
        [
            {
                "params": [w],
                "projector": "svd",
                "rank": 2,
                "update_proj_gap": 1,
                "bits": 4,
                "lazy": {"cos_threshold": threshold, "patience": 2, "gap_growth": 2},
            }
        ],
        lr=1e-3,
    )
    for g in grads:
        w.grad = g
        opt.step()
    return opt.state[w]["projector"].refreshes


def test_q_galore_lazy_refresh_skips_stable_layers():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(16, 1, generator=gen), torch.randn(1, 32, generator=gen)
    stable = [u @ v * 10 + 0.01 * torch.randn(16, 32, generator=gen) for _ in range(30)]
    noisy = [torch.randn(16, 32, generator=gen) for _ in range(30)]
    assert lazy_refreshes(stable, 0.4) < 15  # 30 scheduled; the gap doubles after every 2 stable SVDs
    assert lazy_refreshes(noisy, 0.999) == 30  # never stable: an SVD at every scheduled step


# (7) one step by hand ---------------------------------------------------------------------------


def adam_first(low: torch.Tensor, b1=0.9, b2=0.999, eps=1e-6) -> tuple[torch.Tensor, float]:
    """Adam's normalised direction and step-size factor after one step (galore-torch's form)."""
    return (1 - b1) * low / ((1 - b2) * low**2).sqrt().add(eps), math.sqrt(1 - b2) / (1 - b1)


def one_matrix(shape, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    return model, model[0].weight


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_fira_update_by_hand(shape):
    model, w = one_matrix(shape)
    w0 = w.detach().clone()
    opt = build("fira", model, ctx(target_modules=["0"], weight_decay=0.0), rank=3, scale=0.5, gamma=1.01)
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(shape, generator=gen)
    g2 = 5 * torch.randn(shape, generator=gen)  # a much larger residual: the limiter must act
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    u, _, vh = torch.linalg.svd(g1, full_matrices=False)
    left = shape[0] < shape[1]
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
        S = (g - back(R)) * phi
        if prev is not None and S.norm() > 1.01 * prev:
            S = S * (1.01 * prev / S.norm())
        prev = S.norm()
        step = LR * math.sqrt(1 - b2**t) / (1 - b1**t)
        w_hand = w_hand - step * (0.5 * back(N) + S)
    assert torch.allclose(w, w_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
def test_frugal_update_by_hand(rule):
    model, w = one_matrix((8, 32))
    w0 = w.detach().clone()
    opt = build(
        "frugal",
        model,
        ctx(target_modules=["0"], weight_decay=0.0),
        density=0.25,
        inactive_update_rule=rule,
        inactive_lr_scale=0.1,
    )
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    w.grad = g.clone()
    opt.step()
    P = torch.linalg.svd(g, full_matrices=False)[0][:, :2]  # d = 8, rank round(0.25 * 8) = 2
    R = P.T @ g
    direction, factor = adam_first(R, eps=1e-8)
    S = g - P @ R
    free = S.sign() if rule == "sign_sgd" else S
    w_hand = w0 - LR * factor * (P @ direction) - LR * 0.1 * free
    assert torch.allclose(w, w_hand, atol=1e-6, rtol=0)
    assert opt.state[w]["exp_avg"].shape == (2, 32)


def test_params_validate_with_clear_messages():
    with pytest.raises(ConfigError, match="density=0"):
        gf.FrugalParams(density=0)
    with pytest.raises(ConfigError, match="gamma=0.9"):
        gf.FiraParams(gamma=0.9)
    with pytest.raises(ConfigError, match="proj_bits=3"):
        gf.QGaLoreParams(proj_bits=3)
    with pytest.raises(ConfigError, match="projector='dct'"):
        gf.FrugalParams(projector="dct")
