"""The gradient-norm penalty (Zhao et al., 2022; the family standing in for GLAD): two passes per
step give the gradient of L + lambda ||grad L||, exact on a quadratic, with the weights restored
exactly; in the loop, alpha = 0 is plain training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorabench.method_params.regularizers import GradientNormPenaltyParams
from lorabench.methods.regularizers.gradient_norm_penalty import GradientNormPenalty


class Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(5, 5, generator=g, dtype=torch.float64)
        self.register_buffer("h", m @ m.T + torch.eye(5, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.h @ self.theta


@pytest.mark.parametrize("alpha,radius", [(0.8, 0.05), (1.0, 0.1), (0.3, 0.01)])
def test_two_passes_give_the_gradient_of_the_penalised_loss(alpha, radius):
    model = Quadratic()
    start = model.theta.detach().clone()
    reg = GradientNormPenalty()
    reg.setup(model, None, GradientNormPenaltyParams(gnp_alpha=alpha, gnp_radius=radius), ctx=None)
    for index in range(reg.passes):
        reg.before_forward(model, 0, index)
        model().backward()
        reg.after_backward(model, 0, index)
    assert torch.equal(model.theta.detach(), start)  # restored exactly
    # the penalised objective's gradient by double backward: L + lambda ||g||, lambda = alpha r
    theta = start.clone().requires_grad_()
    loss = 0.5 * theta @ model.h @ theta
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    (expected,) = torch.autograd.grad(loss + alpha * radius * g.norm(), theta)
    torch.testing.assert_close(model.theta.grad, expected, rtol=1e-10, atol=1e-12)
    assert reg.state()["last_gradient_norm"] == pytest.approx(g.norm().item())


def test_alpha_zero_trains_as_plain_lora(tmp_path, gsm8k_dir):
    """On the tiny Llama (no dropout anywhere, so the second pass draws no random numbers)."""
    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    logs = {}
    for method, extra in (("lora", []), ("lora_gnp", ["method.gnp_alpha=0.0"])):
        out = tmp_path / method
        args = tiny_overrides("causal_lm", gsm8k_dir, out, "train.max_steps=3", "method.dropout=0.0", *extra)
        assert train(f"method={method}", *args, "train.log_every=1") == 0
        record = json.loads((only_run_dir(out) / "record.json").read_text())
        assert record["status"] == "completed"
        logs[method] = [entry["loss"] for entry in record["train_log"]]
    assert logs["lora_gnp"] == logs["lora"]  # bitwise: the second pass and its restore leave no trace


def test_the_penalty_changes_the_trajectory(tmp_path, sst2_dir):
    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    finals = []
    for alpha in ("0.0", "1.0"):
        out = tmp_path / alpha
        args = tiny_overrides("classification", sst2_dir, out, "train.max_steps=3", f"method.gnp_alpha={alpha}")
        assert train("method=lora_gnp", *args, "method.dropout=0.0", "train.lr=0.01", "train.log_every=1") == 0
        finals.append(json.loads((only_run_dir(out) / "record.json").read_text())["train_log"][-1]["loss"])
    assert finals[0] != finals[1]
