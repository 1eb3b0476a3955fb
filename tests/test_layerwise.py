"""LISA and BAdam on a 4-layer random BERT: in every period exactly the intended parameters change,
the schedule follows the seed / order, and the optimizer holds the state each reference keeps (LISA:
every layer trained so far, moments kept across re-freezing; BAdam: the active set, reset at each
switch)."""

from __future__ import annotations

import numpy as np
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


def _run(method: str, steps: int, seed: int = 0, head: str = "classification", **overrides):
    """Train ``steps`` steps as the loop does; returns the procedure, the optimizer, the model and
    the set of parameter names that changed in each period (periods start where the schedule says)."""
    spec = resolve_method({**PRESETS[method], **overrides})
    ctx = MethodContext([], head, lr=1e-2, weight_decay=0.01, max_steps=steps, seed=seed)
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


def _named(model, names) -> list:
    params = dict(model.named_parameters())
    return [params[n] for n in sorted(names)]


def _state_bytes_of(params) -> int:
    return sum(2 * p.numel() * 4 + 4 for p in params)  # exp_avg, exp_avg_sq, fp32 step scalar


# ----------------------------------------------------------------------------- LISA


def test_lisa_trains_embeddings_head_and_the_sampled_layers_only():
    K, gamma, steps = 2, 1, 7
    proc, opt, model, moved, spec, ctx, start = _run("lisa", steps, lisa_interval_steps=K, lisa_activated_layers=gamma)
    assert [p["start_step"] for p in proc.periods] == [0, 2, 4, 6]  # no switch after the last step
    rng = np.random.RandomState(0)  # LMFlow: np.random.choice on the generator the run's seed seeded
    expected_schedule = [sorted(rng.choice(LAYERS, gamma, replace=False).tolist()) for _ in proc.periods]
    assert [p["layers"] for p in proc.periods] == expected_schedule
    for period, changed in zip(proc.periods, moved):
        assert changed == _non_layer_names(model) | _layer_names(model, period["layers"])
    union = {i for p in proc.periods for i in p["layers"]}
    assert set().union(*moved) == _non_layer_names(model) | _layer_names(model, union)
    # re-frozen layers keep their Adam state (LMFlow leaves the optimizer alone): it covers every layer
    # trained so far, and a layer's step count is the number of steps it trained
    kept = _named(model, _non_layer_names(model) | _layer_names(model, union))
    assert {id(p) for p in opt.state} == {id(p) for p in kept}
    assert optimizer_state_bytes(opt) == _state_bytes_of(kept)
    for i in union:
        trained = sum(min(K, steps - p["start_step"]) for p in proc.periods if i in p["layers"])
        for p in _named(model, _layer_names(model, [i])):
            assert int(opt.state[p]["step"]) == trained
    active = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in active) < sum(p.numel() for p in model.parameters())
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)
    assert proc.state()["lisa_num_layers"] == LAYERS


def test_lisa_schedule_depends_on_the_seed():
    def layers(seed):
        return [p["layers"] for p in _run("lisa", 8, seed, lisa_interval_steps=1, lisa_activated_layers=1)[0].periods]

    assert layers(0) == layers(0) and layers(0) != layers(1)


# ----------------------------------------------------------------------------- BAdam


def _embedding_names(model) -> set[str]:
    return {n for n in _non_layer_names(model) if "embed" in n}


def _head_names(model) -> set[str]:
    """Pooler and classifier: the non-layer, non-embedding tensors (the authors' active_modules)."""
    return _non_layer_names(model) - _embedding_names(model)


def _layer_blocks(model) -> dict[str, set[str]]:
    return {f"bert.encoder.layer.{i}": _layer_names(model, [i]) for i in range(LAYERS)}


def _starts(K: int, steps: int) -> list[int]:
    """The reference's switch points: after step g when (g + 1) % K == 0, so the first visit has K - 1 steps."""
    return [0] + [g for g in range(1, steps) if (g + 1) % K == 0]


@pytest.mark.parametrize("mode", ["ascending", "descending"])
def test_badam_trains_one_layer_per_period_and_the_head_always(mode):
    K, steps = 3, 3 * LAYERS
    proc, opt, model, moved, spec, ctx, start = _run("badam", steps, switch_every=K, switch_mode=mode)
    order = list(_layer_blocks(model))
    if mode == "descending":
        order.reverse()
    starts = _starts(K, steps)
    assert [p["start_step"] for p in proc.periods] == starts == [0, 2, 5, 8, 11]
    assert [p["block"] for p in proc.periods] == [order[i % LAYERS] for i in range(len(starts))]
    blocks = _layer_blocks(model)
    for period, changed in zip(proc.periods, moved):
        assert changed == blocks[period["block"]] | _head_names(model)  # embeddings never train
    # the state was reset at the last switch: the active block and the head, one step each
    active = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in active} == {id(p) for p in _named(model, blocks[order[0]] | _head_names(model))}
    assert {id(p) for p in opt.state} == {id(p) for p in active}
    assert {int(s["step"]) for s in opt.state.values()} == {steps - starts[-1]}
    assert optimizer_state_bytes(opt) == _state_bytes_of(active)
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)
    assert proc.state()["badam_non_layer"] == "active"


def test_badam_random_mode_draws_the_references_permutations():
    proc, opt, model, moved, spec, ctx, start = _run("badam", 2 * LAYERS, seed=3, switch_every=1, switch_mode="random")
    gen = torch.Generator().manual_seed(3)  # torch.randperm per block-epoch, taken from its end
    expected = [i for _ in range(2) for i in reversed(torch.randperm(LAYERS, generator=gen).tolist())]
    labels = list(_layer_blocks(model))
    assert [p["block"] for p in proc.periods] == [labels[i] for i in expected]
    assert expected[:LAYERS] != list(range(LAYERS))  # not ascending for seed 3
    for period, changed in zip(proc.periods, moved):
        assert changed == _layer_blocks(model)[period["block"]] | _head_names(model)
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)


def test_badam_blocks_mode_makes_embeddings_and_the_rest_blocks():
    K, D = 2, LAYERS + 2
    proc, opt, model, moved, spec, ctx, start = _run("badam", K * D, switch_every=K, badam_non_layer="blocks")
    blocks = {"embeddings": _embedding_names(model), **_layer_blocks(model), "rest": _head_names(model)}
    assert [p["block"] for p in proc.periods] == list(blocks) + ["embeddings"]
    for period, changed in zip(proc.periods, moved):
        assert changed == blocks[period["block"]]
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)


@pytest.mark.parametrize("head,overrides", [("causal_lm", {}), ("classification", {"badam_non_layer": "frozen"})])
def test_badam_frozen_non_layer_never_trains(head, overrides):
    """The reference's defaults (and ``auto`` for causal LMs, whose head is pretrained)."""
    K = 2
    proc, opt, model, moved, spec, ctx, start = _run("badam", K * LAYERS, head=head, switch_every=K, **overrides)
    assert proc.state()["badam_non_layer"] == "frozen"
    for period, changed in zip(proc.periods, moved):
        assert changed == _layer_blocks(model)[period["block"]]
    assert start == proc.expected_trainable(_model(), spec.params["procedure"], ctx)


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("badam", {"switch_every": 1, "switch_mode": "random"}),
        ("lisa", {"lisa_interval_steps": 1, "lisa_activated_layers": 2}),
    ],
)
def test_state_dict_resumes_the_schedule(method, overrides):
    """A procedure rebuilt and loaded from a JSON round trip of its state after step 6 continues the
    schedule of an uninterrupted one (the random draws are replayed) and trains the same tensors."""
    import json

    ctx = MethodContext([], "classification", lr=1e-2, weight_decay=0.0, max_steps=12, seed=5)

    def build():  # a spec of its own: the resolved spec holds the procedure instance
        model = _model()
        return model, apply_method(model, resolve_method({**PRESETS[method], **overrides}), ctx).procedure

    _, full = build()
    _, first = build()
    for step in range(1, 13):
        full.on_step_end(step)
    for step in range(1, 7):
        first.on_step_end(step)
    model, resumed = build()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for step in range(7, 13):
        resumed.on_step_end(step)
    assert resumed.periods == full.periods and len(full.periods) == 12
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = full.periods[-1]
    expected = (
        _layer_blocks(model)[last["block"]] | _head_names(model)
        if method == "badam"
        else _non_layer_names(model) | _layer_names(model, last["layers"])
    )
    assert trainable == expected
