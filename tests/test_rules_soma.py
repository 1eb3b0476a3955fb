"""The ``soma_wd`` procedure's rules on a bare model: the cosine weight-decay schedule reaches wd_end
after train.max_steps steps (one step included), only groups of >= 2-D tensors are annealed, and
``state()`` reports the schedule, the decay of the last step taken (none before the first) and of
the next one, and the frozen blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext
from lorabench.methods.procedures.soma import SomaWdParams, SomaWeightDecay, cosine_weight_decay

START, END = 0.05, 1e-5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.head = nn.Linear(3, 2)
        for p in self.layers[0].parameters():
            p.requires_grad_(False)


def build(max_steps: int):
    model = Tiny()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.3},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    proc = SomaWeightDecay()
    ctx = MethodContext([], "classification", lr=1e-3, weight_decay=0.3, max_steps=max_steps, seed=0)
    proc.setup(model, opt, SomaWdParams(soma_wd_start=START, soma_wd_end=END), ctx)
    return opt, proc


def test_one_step_run_decays_from_start_to_end():
    opt, proc = build(max_steps=1)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(START)
    proc.on_step_end(1)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(END)
    assert opt.param_groups[1]["weight_decay"] == 0.0  # 1-D tensors keep their decay


def test_state_reports_the_schedule_the_last_and_the_next_decay():
    total = 4
    opt, proc = build(max_steps=total)
    state = proc.state()
    assert state["soma_wd_schedule"] == "cosine" and state["soma_wd_last"] is None
    assert state["soma_wd_next"] == pytest.approx(START) and state["soma_wd_steps"] == 0
    assert state["soma_num_blocks"] == 3 and state["soma_frozen_blocks"] == [0]
    for step in (1, 2):
        proc.on_step_end(step)
        state = proc.state()
        assert state["soma_wd_last"] == pytest.approx(cosine_weight_decay(step - 1, total, START, END))
        assert state["soma_wd_next"] == pytest.approx(cosine_weight_decay(step, total, START, END))
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(state["soma_wd_next"])
    half = END + (START - END) * (1 + math.cos(math.pi * 2 / total)) / 2
    assert proc.state()["soma_wd_next"] == pytest.approx(half)


@pytest.mark.parametrize(
    "params,message",
    [
        (
            {"soma_wd_start": -0.1},
            "method.soma_wd_start=-0.1 is invalid; it must be >= 0",
        ),
        (
            {"soma_wd_end": -1e-5},
            "method.soma_wd_end=-1e-05 is invalid; it must be >= 0",
        ),
        (
            {"soma_wd_start": 0.01, "soma_wd_end": 0.02},
            "method.soma_wd_end=0.02 exceeds method.soma_wd_start=0.01; the schedule anneals the weight decay down",
        ),
    ],
)
def test_invalid_schedules_name_the_keys_and_values(params, message):
    with pytest.raises(ConfigError) as err:
        SomaWdParams(**params)
    assert str(err.value) == message


@pytest.mark.parametrize("start,end", [(0.0, 0.0), (0.02, 0.02), (0.05, 0.0)])
def test_zero_and_constant_schedules_are_accepted(start, end):
    params = SomaWdParams(soma_wd_start=start, soma_wd_end=end)
    assert [cosine_weight_decay(t, 4, params.soma_wd_start, params.soma_wd_end) for t in (0, 4)] == [start, end]


def test_no_group_to_decay_is_an_error():
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and p.ndim < 2], lr=1e-3)
    ctx = MethodContext([], "classification", lr=1e-3, weight_decay=0.0, max_steps=4, seed=0)
    with pytest.raises(ValueError) as err:
        SomaWeightDecay().setup(model, opt, SomaWdParams(), ctx)
    assert str(err.value) == "the soma_wd procedure found no optimizer group of >= 2-D tensors to decay"


def test_a_model_without_a_layer_list_reports_no_blocks():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]}], lr=1e-3)
    proc = SomaWeightDecay()
    ctx = MethodContext([], "classification", lr=1e-3, weight_decay=0.0, max_steps=4, seed=0)
    proc.setup(model, opt, SomaWdParams(), ctx)
    assert proc.state()["soma_num_blocks"] == 0 and proc.state()["soma_frozen_blocks"] == []
