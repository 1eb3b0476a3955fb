"""LoRA-Pro and ALLoRA: the closed forms and update rules checked against independent computations
(a least-squares projection, scipy's Sylvester solver, hand-written Adam steps), their memory
accounting, and the adapter settings they require."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import solve_sylvester

from lorabench.errors import ConfigError
from lorabench.measure import optimizer_state_bytes
from lorabench.methods.optimizers.allora import ALLoRAAdamW, allora_coefficient
from lorabench.methods.optimizers.lora_pro import LoraProAdamW, lora_pairs, lora_pro_gradients, solve_sylvester_sym
from tests.method_harness import one_step

M, N, R, S = 7, 5, 2, 2.0


def _problem(seed: int = 0, zero_b: bool = False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, N, generator=g, dtype=torch.float64)
    b = torch.zeros(M, R, dtype=torch.float64) if zero_b else torch.randn(M, R, generator=g, dtype=torch.float64)
    full = torch.randn(M, N, generator=g, dtype=torch.float64)
    return a, b, full, S * b.T @ full, S * full @ a.T  # LoRA's own gradients of A and B


def _projection(a, b, full):
    """Least-squares projection of G onto {B Y + Z A} (column-major vec: vec(BY) = (I ⊗ B) vec Y,
    vec(ZA) = (Aᵀ ⊗ I) vec Z; the basis is rank-deficient, lstsq takes the minimum-norm solution)."""
    a, b, full = a.numpy(), b.numpy(), full.numpy()
    basis = np.concatenate([np.kron(np.eye(N), b), np.kron(a.T, np.eye(M))], axis=1)
    vec = full.reshape(-1, order="F")
    coef = np.linalg.lstsq(basis, vec, rcond=None)[0]
    return torch.from_numpy((basis @ coef).reshape(M, N, order="F"))


@pytest.mark.parametrize("scale", [S, 0.5])  # the parity fixture covers only the reference's hard-coded 2
def test_lora_pro_equivalent_gradient_is_the_projection_of_the_full_gradient(scale):
    a, b, full, _, _ = _problem()
    ga, gb = scale * b.T @ full, scale * full @ a.T
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, scale, ridge=1e-12)
    adjusted = scale * (b @ new_a + new_b @ a)
    vanilla = scale * (b @ ga + gb @ a)
    torch.testing.assert_close(adjusted, _projection(a, b, full), atol=1e-9, rtol=1e-9)
    assert (adjusted - full).norm() < (vanilla - full).norm()


def test_lora_pro_x_keeps_the_adjusted_gradients_closest_to_lora_s():
    a, b, full, ga, gb = _problem(1)
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, S, ridge=1e-12)

    def distance(x):  # the solution family of Theorem 2.1 moved by X: (g_A + X A, g_B - B X)
        return (new_a + x @ a - ga).norm() ** 2 + (new_b - b @ x - gb).norm() ** 2

    # first-order condition of this convex problem: (g_A' - g_A) Aᵀ - Bᵀ(g_B' - g_B) = 0
    stationarity = (new_a - ga) @ a.T - b.T @ (new_b - gb)
    assert stationarity.norm() < 1e-8 * ga.norm()
    best = distance(torch.zeros(R, R, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    for _ in range(5):  # ± pairs: a non-optimal X loses on one side of every pair
        delta = 1e-3 * torch.randn(R, R, generator=g, dtype=torch.float64)
        assert distance(delta) > best and distance(-delta) > best


def test_sylvester_solver_matches_scipy():
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    s1, s2, c = p @ p.T, q @ q.T, torch.randn(4, 4, generator=g, dtype=torch.float64)
    expected = torch.from_numpy(solve_sylvester(s1.numpy(), s2.numpy(), c.numpy()))
    torch.testing.assert_close(solve_sylvester_sym(s1, s2, c), expected, atol=1e-9, rtol=1e-9)


def test_lora_pro_at_zero_b_projects_onto_the_row_space_of_a():
    a, b, full, ga, gb = _problem(4, zero_b=True)
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, S, ridge=1e-12)
    assert torch.count_nonzero(new_a) == 0
    row_space = a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(S * new_b @ a, full @ row_space, atol=1e-9, rtol=1e-9)


def test_lora_pro_full_mode_step_matches_a_hand_computed_adam_step():
    a0, b0, full, ga, gb = _problem(5)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    a.grad, b.grad = ga.clone(), gb.clone()
    lr, eps, wd = 0.1, 0.5, 0.01  # a large eps makes the first Adam step depend on magnitudes
    opt = LoraProAdamW([{"params": [a, b], "pair_scale": S}], lr=lr, eps=eps, weight_decay=wd, mode="full")
    opt.step()
    ea, eb = lora_pro_gradients(a0, b0, ga, gb, S)
    equivalent = S * (b0 @ ea + eb @ a0)
    u = equivalent / (equivalent.abs() + eps)  # first Adam step: m̂ = g, v̂ = g²
    da, db = lora_pro_gradients(a0, b0, S * b0.T @ u, S * u @ a0.T, S)
    shrink = 1 - lr * wd  # the reference's SGD weight decay, p - lr (g + wd p), on A and on B
    torch.testing.assert_close(a.detach(), shrink * a0 - lr * da, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(b.detach(), shrink * b0 - lr * db, atol=1e-10, rtol=1e-10)
    state = opt.state[b]
    assert state["exp_avg"].shape == (M, N) and a not in opt.state  # m x n moments, one set per pair


def test_lora_pro_efficient_mode_is_adamw_on_the_adjusted_gradients():
    """Two steps by hand: AdamW (decay before the step) on (g_A', g_B'), moments of A and of B."""
    a0, b0, full, _, _ = _problem(6)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    lr, eps, wd, (beta1, beta2) = 0.05, 0.3, 0.1, (0.9, 0.999)
    opt = LoraProAdamW([{"params": [a, b], "pair_scale": S}], lr=lr, eps=eps, weight_decay=wd, mode="efficient")
    ea, eb = a0.clone(), b0.clone()
    moments = {"a": [0.0, 0.0], "b": [0.0, 0.0]}
    for t in (1, 2):
        grads = lora_pro_gradients(ea, eb, S * eb.T @ full, S * full @ ea.T, S)
        a.grad, b.grad = S * b.detach().T @ full, S * full @ a.detach().T
        opt.step()
        new = []
        for key, theta, g in zip("ab", (ea, eb), grads):
            m, v = moments[key]
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            moments[key] = [m, v]
            step = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            new.append(theta * (1 - lr * wd) - lr * step)
        ea, eb = new
    torch.testing.assert_close(a.detach(), ea, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(b.detach(), eb, atol=1e-10, rtol=1e-10)
    assert opt.state[a]["exp_avg"].shape == a.shape and opt.state[b]["exp_avg"].shape == b.shape


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lora_pro_state_bytes(mode, sst2_dir, tmp_path):
    result = one_step("lora_pro", sst2_dir, tmp_path, f"method.lora_pro_mode={mode}")
    model, opt = result.built.model, result.built.optimizer
    pairs = lora_pairs(model)
    assert pairs and all(s == 2.0 for _, _, s in pairs)  # alpha 16 / rank 8
    paired = {id(t) for a, b, _ in pairs for t in (a, b)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    expected = sum(2 * p.numel() * 4 + 4 for p in rest)
    if mode == "full":  # exp_avg and exp_avg_sq of the m x n equivalent gradient + a step scalar
        expected += sum(2 * b.shape[0] * a.shape[1] * 4 + 4 for a, b, _ in pairs)
    else:  # LoRA's AdamW memory
        expected += sum(2 * t.numel() * 4 + 4 for a, b, _ in pairs for t in (a, b))
    assert optimizer_state_bytes(opt) == expected


def test_lora_pro_refuses_dora(sst2_dir, tmp_path):
    with pytest.raises(ConfigError, match="DoRA"):
        one_step("lora_pro", sst2_dir, tmp_path, "method.use_dora=true")


# ----------------------------------------------------------------------------- ALLoRA


def _hand_allora_adamw(theta, grad, lr, eps, wd, eta, norm):
    coef = (
        1 / torch.sqrt((theta**2).sum(1, keepdim=True) + 1 / eta**2)
        if norm == "row"
        else 1 / torch.sqrt((theta**2).sum() + 1 / eta**2)
    )
    g = grad * coef
    return theta * (1 - lr * wd) - lr * g / (g.abs() + eps)  # first AdamW step: m̂ = g, v̂ = g²


def test_allora_one_step_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(6, 4, generator=gen, dtype=torch.float64) * torch.tensor(
        [[0.1], [0.5], [1], [2], [4], [0]], dtype=torch.float64
    )
    grad = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    lr, eps, wd, eta = 0.1, 0.3, 0.01, 2.0  # a large eps makes the first Adam step see the scaling
    p = torch.nn.Parameter(theta0.clone())
    p.grad = grad.clone()
    opt = ALLoRAAdamW([{"params": [p], "allora": True, "eta": eta, "norm": "row"}], lr=lr, eps=eps, weight_decay=wd)
    opt.step()
    expected = _hand_allora_adamw(theta0, grad, lr, eps, wd, eta, "row")
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=1e-12)
    # the test can tell the rule apart from plain AdamW and from a whole-tensor norm
    plain = theta0 * (1 - lr * wd) - lr * grad / (grad.abs() + eps)
    assert not torch.allclose(p.detach(), plain)
    assert not torch.allclose(p.detach(), _hand_allora_adamw(theta0, grad, lr, eps, wd, eta, "tensor"))
    # the zero row gets the maximal coefficient eta
    assert allora_coefficient(theta0, eta)[5].item() == pytest.approx(eta)


@pytest.mark.parametrize("norm", ["row", "tensor"])
def test_allora_steps_match_an_independent_adamw_loop(norm):
    """Eight steps of A (r x d_in), a square B-like tensor and B (d_out x r, zero init): the coefficient
    from each step's weights before the decay, then AdamW with its decay before the update."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (5, 5), (7, 4)]
    thetas = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes[:2]]
    thetas.append(torch.zeros(*shapes[2], dtype=torch.float64))  # LoRA's B
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    lr, eps, wd, eta, (beta1, beta2) = 0.05, 1e-3, 0.2, 2.0, (0.9, 0.999)
    opt = ALLoRAAdamW([{"params": params, "allora": True, "eta": eta, "norm": norm}], lr=lr, eps=eps, weight_decay=wd)
    state = [[torch.zeros_like(t), torch.zeros_like(t)] for t in thetas]
    for t in range(1, 9):
        grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (theta, g) in enumerate(zip(thetas, grads)):
            sq = (theta**2).sum(1, keepdim=True) if norm == "row" else (theta**2).sum()
            g = g / torch.sqrt(sq + 1 / eta**2)
            m, v = state[i]
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            state[i] = [m, v]
            step = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            thetas[i] = theta * (1 - lr * wd) - lr * step
    for p, theta in zip(params, thetas):
        torch.testing.assert_close(p.detach(), theta, atol=1e-12, rtol=1e-12)


def test_allora_preset_has_no_dropout_and_unit_scale(sst2_dir, tmp_path):
    result = one_step("allora", sst2_dir, tmp_path, "method.rank=4")
    config = result.built.model.peft_config["default"]
    assert config.lora_dropout == 0 and config.lora_alpha == config.r == 4
    assert isinstance(result.built.optimizer, ALLoRAAdamW)
    assert any(g.get("allora") for g in result.built.optimizer.param_groups)


def test_allora_refuses_a_scaled_lora(sst2_dir, tmp_path):
    with pytest.raises(ConfigError, match="alpha=method.rank"):
        one_step("allora", sst2_dir, tmp_path, "method.alpha=16")
