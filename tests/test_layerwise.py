"""LISA and BAdam on a 4-layer random BERT: in every period exactly the intended parameters change,
the schedule follows the seed / order, and the optimizer holds state for the active set only."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lorabench.measure import optimizer_state_bytes
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method
from lorabench.methods.catalog import load_presets
from lorabench.methods.spec import resolve_method
from tests.conftest import CONF_DIR

PRESETS = load_presets(CONF_DIR / "method")
LAYERS = 4
PREFIX = "bert.encoder.layer."


def _model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _run(method: str, steps: int, seed: int = 0, **overrides):
    """Train ``steps`` steps as the loop does; returns the procedure, the optimizer, the model and
    the set of parameter names that changed in each period (periods start where the schedule says)."""
    spec = resolve_method({**PRESETS[method], **overrides})
    ctx = MethodContext([], "classification", lr=1e-2, weight_decay=0.01, max_steps=steps, seed=seed)
    built = apply_method(_model(), spec, ctx)
    model, opt, proc = built.model, built.optimizer, built.procedure
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 64, (4, 8), generator=gen), "labels": torch.tensor([0, 1, 0, 1])}
    snap = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    trainable_at_start = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moved, before = [], snap()
    for step in range(steps):
        model(**batch).loss.backward()
        proc.after_backward(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_periods = len(proc.periods)
        proc.on_step_end(step + 1)
        if len(proc.periods) > n_periods or step + 1 == steps:  # a period ended
            after = snap()
            moved.append({n for n in after if not torch.equal(after[n], before[n])})
            before = after
    return proc, opt, model, moved, spec, ctx, trainable_at_start


def _layer_names(model, layers) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(n.startswith(f"{PREFIX}{i}.") for i in layers)}


def _non_layer_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if not n.startswith(PREFIX)}


def _state_bytes_of(params) -> int:
    return sum(2 * p.numel() * 4 + 4 for p in params)  # exp_avg, exp_avg_sq, fp32 step scalar


# ----------------------------------------------------------------------------- LISA


def test_lisa_trains_embeddings_head_and_the_sampled_layers_only():
    K, gamma, steps = 2, 1, 7
    proc, opt, model, moved, spec, ctx, start = _run("lisa", steps, lisa_interval_steps=K, lisa_activated_layers=gamma)
    assert [p["start_step"] for p in proc.periods] == [0, 2, 4, 6]  # no switch after the last step
    rng = random.Random(0)
    expected_schedule = [sorted(rng.sample(range(LAYERS), gamma)) for _ in proc.periods]
    assert [p["layers"] for p in proc.periods] == expected_schedule
    for period, changed in zip(proc.periods, moved):
        assert changed == _non_layer_names(model) | _layer_names(model, period["layers"])
    union = {i for p in proc.periods for i in p["layers"]}
    assert set().union(*moved) == _non_layer_names(model) | _layer_names(model, union)
    # after the last switch only the active set holds optimizer state
    active = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in opt.state} == {id(p) for p in active}
    assert optimizer_state_bytes(opt) == _state_bytes_of(active)
    assert sum(p.numel() for p in active) < sum(p.numel() for p in model.parameters())
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)
    assert proc.state()["lisa_num_layers"] == LAYERS


def test_lisa_schedule_depends_on_the_seed():
    def layers(seed):
        return [p["layers"] for p in _run("lisa", 8, seed, lisa_interval_steps=1, lisa_activated_layers=1)[0].periods]

    assert layers(0) == layers(0) and layers(0) != layers(1)


# ----------------------------------------------------------------------------- BAdam


def _blocks(model) -> dict[str, set[str]]:
    names = {n for n, _ in model.named_parameters()}
    blocks = {"embeddings": {n for n in names if not n.startswith(PREFIX) and "embed" in n}}
    blocks.update({f"bert.encoder.layer.{i}": _layer_names(model, [i]) for i in range(LAYERS)})
    blocks["rest"] = {n for n in names if not n.startswith(PREFIX) and "embed" not in n}
    return blocks


@pytest.mark.parametrize("mode", ["ascending", "descending"])
def test_badam_trains_one_block_per_period(mode):
    K = 2
    D = LAYERS + 2
    proc, opt, model, moved, spec, ctx, start = _run("badam", K * D, switch_every=K, switch_mode=mode)
    order = list(_blocks(model))
    if mode == "descending":
        order.reverse()
    assert [p["block"] for p in proc.periods] == order
    assert [p["start_step"] for p in proc.periods] == list(range(0, K * D, K))
    blocks = _blocks(model)
    for period, changed in zip(proc.periods, moved):
        assert changed == blocks[period["block"]]
    active = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    assert {id(p) for p in active} == {id(named[n]) for n in blocks[order[-1]]}
    assert {id(p) for p in opt.state} == {id(p) for p in active}
    assert optimizer_state_bytes(opt) == _state_bytes_of(active)
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)


def test_badam_random_mode_visits_every_block_once_per_epoch():
    D = LAYERS + 2
    proc, opt, model, moved, spec, ctx, start = _run("badam", 2 * D, seed=3, switch_every=1, switch_mode="random")
    visited = [p["block"] for p in proc.periods]
    assert sorted(visited[:D]) == sorted(visited[D:]) == sorted(_blocks(model))
    assert visited[:D] != sorted(_blocks(model), key=list(_blocks(model)).index)  # not ascending for seed 3
    blocks = _blocks(model)
    for period, changed in zip(proc.periods, moved):
        assert changed == blocks[period["block"]]
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)


def test_badam_non_layer_always_trains_with_every_layer_block():
    K = 2
    proc, opt, model, moved, spec, ctx, start = _run("badam", K * LAYERS, switch_every=K, badam_non_layer="always")
    assert [p["block"] for p in proc.periods] == [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
    for i, changed in enumerate(moved):
        assert changed == _non_layer_names(model) | _layer_names(model, [i])
    active = [p for p in model.parameters() if p.requires_grad]
    assert optimizer_state_bytes(opt) == _state_bytes_of(active)
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)
