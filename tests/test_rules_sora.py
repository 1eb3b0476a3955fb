"""The ``sora`` procedure's rules on bare SoRA layers: the linear lambda staircase, the threshold
tau = lambda (x lr with ``lambda_times_lr``), the lr of the gates' group read at every step, and what
``state()`` reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.methods.adapters.sora import SoraLayer
from lorabench.methods.base import MethodContext
from lorabench.methods.procedures.sora import SoraProximal, SoraProximalParams

LR = 0.05


def build(max_steps: int = 10, **params):
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(SoraLayer(nn.Linear(5, 3), 4, 4.0, gen), SoraLayer(nn.Linear(3, 2), 4, 4.0, gen))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    proc = SoraProximal()
    ctx = MethodContext([], "classification", lr=1.0, weight_decay=0.0, max_steps=max_steps, seed=0)
    proc.setup(net, opt, SoraProximalParams(**params), ctx)
    return net, opt, proc


def test_linear_schedule_is_a_staircase_of_lambda_num_stages():
    _, _, proc = build(sparse_lambda=0.1, max_lambda=0.5, lambda_num=5, lambda_schedule="linear")
    # stage = min(4, step * 5 // 10) = step // 2, capped at the last stage; lambda = 0.1 + 0.4 * stage / 4
    want = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5]
    assert [proc.lambda_at(step) for step in range(12)] == pytest.approx(want)


def test_two_stage_schedule_switches_half_way():
    _, _, proc = build(sparse_lambda=0.1, max_lambda=0.3, lambda_num=2, lambda_schedule="linear")
    assert [proc.lambda_at(step) for step in (0, 4, 5, 9)] == pytest.approx([0.1, 0.1, 0.3, 0.3])


@pytest.mark.parametrize("schedule,num", [("none", 5), ("linear", 1)])
def test_constant_lambda_without_a_schedule_or_with_one_stage(schedule, num):
    _, _, proc = build(sparse_lambda=0.1, max_lambda=0.5, lambda_num=num, lambda_schedule=schedule)
    assert [proc.lambda_at(step) for step in (0, 5, 9, 20)] == [0.1] * 4


def test_after_backward_takes_the_lambda_of_its_step():
    _, _, proc = build(sparse_lambda=0.1, max_lambda=0.5, lambda_num=5, lambda_schedule="linear")
    proc.after_backward(6)
    assert proc.current_lambda == pytest.approx(0.4) and proc.state()["sora_lambda"] == pytest.approx(0.4)


def test_threshold_is_lambda_or_lambda_times_the_groups_lr():
    _, _, proc = build(sparse_lambda=0.2)
    assert proc.threshold() == pytest.approx(0.2)
    _, _, proc = build(sparse_lambda=0.2, lambda_times_lr=True)
    assert proc.threshold() == pytest.approx(0.2 * LR)
    proc.group["lr"] = 0.5  # a scheduler moved the gates' lr: the step about to be taken uses it
    proc.after_backward(0)
    assert proc.threshold() == pytest.approx(0.2 * 0.5)


def test_on_step_end_thresholds_every_gate():
    """Entries beyond +-tau move tau towards 0, then every |g| < tau is zeroed (0.5 -> 0.2 -> 0)."""
    net, _, proc = build(sparse_lambda=0.3)
    with torch.no_grad():
        for layer in net:
            layer.gate.copy_(torch.tensor([-1.0, -0.2, 0.5, 0.7]))
    proc.after_backward(0)
    proc.on_step_end(1)
    for layer in net:
        torch.testing.assert_close(layer.gate.detach(), torch.tensor([-0.7, 0.0, 0.0, 0.4]))
    assert proc.state()["sora_ranks"] == {"0": 2, "1": 2}
