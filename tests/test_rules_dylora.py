"""The ``dylora`` procedure's rules on two bare DyLoRA layers: the rank drawn per step is counted,
frozen mode zeroes the gradients of ranks < b only, the post-training rank curve evaluates every
rank 1..r_max and restores the eval rank, and a checkpoint restores the training rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.methods.adapters.dylora import DyLoraLayer
from lorabench.methods.base import MethodContext
from lorabench.methods.procedures.dylora import DyLoraSampling, DyLoraSamplingParams

R_MAX = 4


def model(eval_rank: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(
        DyLoraLayer(nn.Linear(5, 3), R_MAX, 1, 4.0, eval_rank, gen),
        DyLoraLayer(nn.Linear(3, 2), R_MAX, 1, 4.0, eval_rank, gen),
    )


def procedure(net: nn.Module, seed: int = 0, **params) -> DyLoraSampling:
    proc = DyLoraSampling()
    ctx = MethodContext([], "classification", lr=1e-3, weight_decay=0.0, max_steps=10, seed=seed)
    proc.setup(net, torch.optim.SGD(net.parameters(), lr=1e-3), DyLoraSamplingParams(**params), ctx)
    return proc


def ones_grads(net: nn.Module) -> None:
    for p in net.parameters():
        p.grad = torch.ones_like(p)


def test_rank_counts_follow_the_drawn_ranks():
    proc = procedure(model())
    drawn = []
    for step in range(12):
        drawn.append(proc.rank)
        proc.after_backward(step)
        proc.on_step_end(step + 1)
    expected = {r: drawn.count(r) for r in sorted(set(drawn))}
    state = proc.state()
    assert state["dylora_rank_counts"] == expected and sum(expected.values()) == 12
    assert list(state["dylora_rank_counts"]) == sorted(expected)
    assert state["dylora_eval_rank"] == R_MAX


def test_eval_rank_is_the_layers_setting():
    assert procedure(model(eval_rank=2)).state()["dylora_eval_rank"] == 2


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_frozen_mode_zeroes_the_gradient_of_ranks_below_b(rank):
    net = model()
    proc = procedure(net, frozen=True)
    proc.rank = rank
    ones_grads(net)
    proc.after_backward(0)
    for layer in net:
        a, b = layer.lora_A.grad, layer.lora_B.grad
        assert torch.all(a[: rank - 1] == 0) and torch.all(a[rank - 1 :] == 1)
        assert torch.all(b[:, : rank - 1] == 0) and torch.all(b[:, rank - 1 :] == 1)


def test_frozen_mode_skips_tensors_without_gradient():
    net = model()
    proc = procedure(net, frozen=True)
    proc.rank = 3
    net[0].lora_B.grad = torch.ones_like(net[0].lora_B)  # lora_A has no gradient
    net[1].lora_A.grad = torch.ones_like(net[1].lora_A)  # lora_B has no gradient
    proc.after_backward(0)
    assert net[0].lora_A.grad is None and net[1].lora_B.grad is None
    assert torch.all(net[0].lora_B.grad[:, :2] == 0) and torch.all(net[1].lora_A.grad[:2] == 0)


def test_unfrozen_mode_keeps_every_gradient():
    net = model()
    proc = procedure(net, frozen=False)
    proc.rank = 3
    ones_grads(net)
    proc.after_backward(0)
    assert all(torch.all(p.grad == 1) for p in net.parameters())


def test_post_training_curve_covers_every_rank_and_restores_the_eval_rank():
    net = model(eval_rank=2)
    proc = procedure(net, eval_all_ranks=True)
    seen = []

    def evaluate():
        seen.append([layer.eval_rank for layer in net])
        return {"accuracy": float(net[0].eval_rank) / 10}

    curve = proc.post_training_evaluations(evaluate)
    assert curve == {r: {"accuracy": r / 10} for r in range(1, R_MAX + 1)}
    assert seen == [[r, r] for r in range(1, R_MAX + 1)]
    assert [layer.eval_rank for layer in net] == [2, 2]


def test_no_post_training_curve_by_default():
    calls = []
    assert procedure(model()).post_training_evaluations(lambda: calls.append(1)) is None
    assert calls == []


def test_checkpoint_restores_the_training_rank_of_every_layer():
    net = model()
    proc = procedure(net)
    for step in range(5):
        proc.after_backward(step)
        proc.on_step_end(step + 1)
    state = proc.state_dict()
    fresh_net = model()
    fresh = procedure(fresh_net, seed=1)
    fresh.load_state_dict(state)
    assert [layer.train_rank for layer in fresh_net] == [proc.rank, proc.rank]
    assert fresh.state() == proc.state()
