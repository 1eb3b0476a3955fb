"""BAdam's and LISA's rules on a bare three-layer model: hyper-parameter validation names the key and
value, BAdam's block partition (no empty embeddings / rest block), the first block of each order and
the permutations it draws, the trainable count of the first period, what ``state()`` reports, and
checkpoints that restore the trainable set and the draw counters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext
from lorabench.methods.procedures.badam import BAdam, BAdamParams, badam_blocks, first_block
from lorabench.methods.procedures.lisa import Lisa, LisaParams, set_trainable, transformer_layers

WIDTHS = (3, 4, 5)  # layers of different sizes, so the trainable count tells which block trains


class Tiny(nn.Module):
    def __init__(self, embed: bool = True, head: bool = True):
        super().__init__()
        torch.manual_seed(0)
        if embed:
            self.embed_tokens = nn.Embedding(7, 3)
        self.layers = nn.ModuleList(nn.Linear(w, 3) for w in WIDTHS)
        if head:
            self.head = nn.Linear(3, 2)


def ctx(seed: int = 0, head: str = "classification", max_steps: int = 20) -> MethodContext:
    return MethodContext([], head, lr=1e-2, weight_decay=0.0, max_steps=max_steps, seed=seed)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def badam(model: nn.Module, c: MethodContext | None = None, **params) -> BAdam:
    proc = BAdam()
    proc.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2), BAdamParams(**params), c or ctx())
    return proc


def lisa(model: nn.Module, c: MethodContext | None = None, **params) -> Lisa:
    proc = Lisa()
    proc.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2), LisaParams(**params), c or ctx())
    return proc


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "cls,params,message",
    [
        (BAdamParams, {"switch_every": 0}, "method.switch_every=0"),
        (BAdamParams, {"switch_mode": "sideways"}, "method.switch_mode='sideways'"),
        (BAdamParams, {"badam_non_layer": "some"}, "method.badam_non_layer='some'"),
        (LisaParams, {"lisa_activated_layers": 0}, "method.lisa_activated_layers=0"),
        (LisaParams, {"lisa_interval_steps": -1}, "method.lisa_interval_steps=-1"),
    ],
)
def test_invalid_hyper_parameters_name_the_key_and_value(cls, params, message):
    with pytest.raises(ConfigError) as err:
        cls(**params)
    assert str(err.value).startswith(message)


# ----------------------------------------------------------------------------- BAdam


@pytest.mark.parametrize(
    "embed,head,labels",
    [
        (True, True, ["embeddings", "layers.0", "layers.1", "layers.2", "rest"]),
        (False, True, ["layers.0", "layers.1", "layers.2", "rest"]),
        (True, False, ["embeddings", "layers.0", "layers.1", "layers.2"]),
    ],
)
def test_blocks_mode_has_no_empty_block(embed, head, labels):
    blocks, always = badam_blocks(Tiny(embed, head), "blocks", "classification")
    assert [label for label, _ in blocks] == labels and always == []
    assert all(params for _, params in blocks)


@pytest.mark.parametrize("mode,first", [("ascending", 0), ("descending", 2)])
def test_fixed_orders_draw_no_permutation(mode, first):
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state().clone()
    assert first_block(3, mode, gen) == (first, [], 0)
    assert torch.equal(gen.get_state(), before)


def test_random_order_draws_one_permutation_and_starts_from_its_end():
    order = torch.randperm(3, generator=torch.Generator().manual_seed(3)).tolist()
    assert first_block(3, "random", torch.Generator().manual_seed(3)) == (order[-1], order[:-1], 1)


@pytest.mark.parametrize("seed", range(6))
def test_expected_trainable_is_the_first_random_block(seed):
    torch.manual_seed(100 + seed)  # the global generator must play no part
    model = Tiny()
    proc = badam(model, ctx(seed), switch_mode="random", badam_non_layer="blocks")
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(200 + seed)
    assert proc.expected_trainable(Tiny(), BAdamParams(switch_mode="random", badam_non_layer="blocks"), ctx(seed)) == (
        actual
    )


def test_state_reports_blocks_active_modules_and_periods():
    model = Tiny()
    proc = badam(model, switch_every=2)
    for step in range(4):
        proc.on_step_end(step + 1)
    state = proc.state()
    assert state["badam_blocks"] == ["layers.0", "layers.1", "layers.2"]
    assert state["badam_non_layer"] == "active"
    assert state["badam_active_modules"] == model.head.weight.numel() + model.head.bias.numel()
    assert state["badam_periods"] == [
        {"start_step": 0, "block": "layers.0"},
        {"start_step": 1, "block": "layers.1"},
        {"start_step": 3, "block": "layers.2"},
    ]


def test_badam_checkpoint_restores_the_active_block_only():
    model = Tiny()
    proc = badam(model, switch_every=1)
    proc.on_step_end(1)  # layers.1 is active
    state = proc.state_dict()
    fresh_model = Tiny()
    fresh = badam(fresh_model, switch_every=1)
    fresh.load_state_dict(state)
    active = {"layers.1.weight", "layers.1.bias", "head.weight", "head.bias"}
    assert trainable(fresh_model) == trainable(model) == active
    assert fresh.state_dict() == state


# ----------------------------------------------------------------------------- LISA


def test_lisa_may_activate_every_layer():
    model = Tiny(embed=False)
    proc = lisa(model, lisa_activated_layers=3)
    assert proc.active == [0, 1, 2] and trainable(model) == {n for n, _ in model.named_parameters()}


def test_lisa_refuses_more_layers_than_the_model_has():
    with pytest.raises(ConfigError) as err:
        lisa(Tiny(), lisa_activated_layers=4)
    assert str(err.value) == "method.lisa_activated_layers=4 exceeds the model's 3 layers"


def test_lisa_state_reports_layers_and_periods():
    proc = lisa(Tiny(), lisa_activated_layers=1, lisa_interval_steps=2)
    for step in range(4):
        proc.on_step_end(step + 1)
    state = proc.state()
    assert state["lisa_num_layers"] == 3
    assert [p["start_step"] for p in state["lisa_periods"]] == [0, 2, 4]
    assert all(len(p["layers"]) == 1 for p in state["lisa_periods"])


def test_lisa_checkpoint_restores_draws_and_the_trainable_set():
    model = Tiny()
    proc = lisa(model, lisa_activated_layers=1, lisa_interval_steps=1)
    for step in range(3):
        proc.on_step_end(step + 1)
    state = proc.state_dict()
    assert state["draws"] == 4
    fresh_model = Tiny()
    fresh = lisa(fresh_model, ctx(seed=0), lisa_activated_layers=1, lisa_interval_steps=1)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and trainable(fresh_model) == trainable(model)
    proc.on_step_end(4)
    fresh.on_step_end(4)
    assert fresh.active == proc.active  # the replayed generator continues the same schedule


# ----------------------------------------------------------------------------- the layer list


class Lists(nn.Module):
    def __init__(self, *lists):
        super().__init__()
        for i, modules in enumerate(lists):
            self.add_module(f"list{i}", nn.ModuleList(modules))


def test_layer_list_is_the_list_with_the_most_parameters_first_on_ties():
    name, layers = transformer_layers(Lists([nn.Linear(2, 2)], [nn.Linear(3, 3)], [nn.Linear(3, 3)]))
    assert name == "list1" and len(layers) == 1  # a one-layer list counts; 12 parameters beat 6; ties keep the first


def test_a_list_holding_a_single_parameter_is_found():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

    assert transformer_layers(Lists([Scalar()]))[0] == "list0"


def test_no_layer_list_is_an_error_naming_the_model():
    with pytest.raises(ConfigError) as err:
        transformer_layers(Lists([nn.ReLU()]))
    assert str(err.value) == "found no nn.ModuleList of transformer layers in Lists"


def test_freezing_drops_gradients_and_unfreezing_keeps_them():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    set_trainable([a], False)
    set_trainable([b], True)
    assert not a.requires_grad and a.grad is None
    assert b.requires_grad and torch.equal(b.grad, torch.ones(2))
