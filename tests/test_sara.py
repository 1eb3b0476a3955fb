"""SaRA (adapter ``sara``, procedure ``sara``): the selection, the layer's function and gradient, exact
counts, the nuclear-norm gradient, the progressive re-selection in both modes, the values' decay group,
state and save/load round trips, and the checks of the Params. Hand-computed expectations on tiny layers;
the authors' numbers are in tests/test_parity_sara.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_sara import SaraParams, SaraProgressiveParams
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable
from lorabench.methods.adapters.sara import SaraAdapter, SaraLayer, select, share_count
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.methods.spec import resolve_method

PRESET = {"label": "sara", "adapter": "sara", "optimizer": "adamw", "procedure": "sara"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Net(nn.Module):
    """q: 6 -> 5 and v: 5 -> 6 (with bias), a classifier head 6 -> 2; seeded weights N(0, scale^2)."""

    def __init__(self, seed: int = 0, q_shape=(5, 6), v_shape=(6, 5), scale: float = 1.0):
        super().__init__()
        self.q = nn.Linear(q_shape[1], q_shape[0])
        self.v = nn.Linear(v_shape[1], v_shape[0])
        self.classifier = nn.Linear(v_shape[0], 2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.classifier(torch.tanh(self.v(torch.tanh(self.q(x)))))


def build(overrides: dict | None = None, model: nn.Module | None = None, weight_decay=0.0, steps=10, head="causal_lm"):
    model = model if model is not None else Net()
    spec = resolve_method({**PRESET, **(overrides or {})})
    ctx = MethodContext(["q", "v"], head, 1e-2, weight_decay, steps, 0)
    expected = expected_trainable(model, spec, ctx)
    return apply_method(model, spec, ctx), expected, spec, ctx


def step(built, x, t: int) -> None:
    built.model(x).square().sum().backward()
    built.procedure.after_backward(t)
    built.optimizer.step()
    built.optimizer.zero_grad(set_to_none=True)
    built.procedure.on_step_end(t + 1)


# -- selection ----------------------------------------------------------------------------------------
def test_the_share_keeps_the_smallest_magnitudes_in_row_major_order():
    w = torch.tensor([[0.5, -0.1, 0.3, 0.2], [-0.05, 0.4, -0.3, 0.01]])
    index, bound = select(w, SaraParams(sara_per_mille=375))  # floor(375 * 8 / 1000) = 3
    assert index.tolist() == [1, 4, 7]  # |w| = 0.1, 0.05, 0.01: flat indices ascending, not by size
    assert bound == pytest.approx(0.2)  # the smallest |w| left out
    index, bound = select(w, SaraParams(sara_per_mille=1000))
    assert index.tolist() == list(range(8)) and bound == math.inf


def test_ties_at_the_boundary_go_to_the_lower_flat_index():
    w = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.1, 0.5]])
    index, bound = select(w, SaraParams(sara_per_mille=500))  # 3 of 6; the three 0.1s
    assert index.tolist() == [1, 3, 4] and bound == pytest.approx(0.2)
    index, _ = select(w, SaraParams(sara_per_mille=334))  # 2 of 6: the first two 0.1s by flat index
    assert index.tolist() == [1, 3]


def test_the_threshold_rule_is_the_authors_strict_inequality():
    w = torch.tensor([[0.002, -0.0019, 0.5], [-0.002, 0.0, 0.1]])
    index, bound = select(w, SaraParams(sara_threshold=2e-3))
    assert index.tolist() == [1, 4] and bound == 2e-3  # |w| < 2e-3; 0.002 itself is out


# -- the layer ------------------------------------------------------------------------------------------
def test_delta_w_is_zero_at_init_and_the_forward_is_w0_plus_the_sparse_update():
    built, _, _, _ = build()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    layer = built.model.q
    assert isinstance(layer, SaraLayer)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.equal(layer(x), layer.base(x))
    with torch.no_grad():
        layer.sara_value.add_(torch.linspace(-1, 1, layer.sara_value.numel()))
    delta = layer.delta_weight()
    expected = torch.zeros(5 * 6)
    expected[layer.sara_index] = layer.sara_value.detach() - layer.base.weight.detach().flatten()[layer.sara_index]
    assert torch.equal(delta, expected.view(5, 6))  # only the support moves
    dense = nn.functional.linear(x, layer.base.weight + delta, layer.base.bias)
    torch.testing.assert_close(layer(x), dense, rtol=0, atol=1e-6)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)  # merge = forward
        layer.unmerge()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)


def test_the_values_gradient_is_the_dense_weight_gradient_on_the_support():
    built, _, _, _ = build()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    built.model(x).square().sum().backward()
    reference = Net()  # the same pretrained weights, trained densely
    reference(x).square().sum().backward()
    for name in ("q", "v"):
        layer = getattr(built.model, name)
        dense = getattr(reference, name).weight.grad.flatten()[layer.sara_index]
        torch.testing.assert_close(layer.sara_value.grad, dense, rtol=1e-5, atol=1e-7)
        assert layer.base.weight.grad is None


def test_trainable_counts_are_exact():
    for per_mille in (1, 100, 333, 1000):
        built, expected, _, _ = build({"sara_per_mille": per_mille}, head="classification")
        trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
        head = 6 * 2 + 2  # the classifier 6 -> 2, weight and bias
        assert trainable == expected == per_mille * 30 // 1000 * 2 + head
    model = Net()
    threshold = 0.5
    counted = sum(int((getattr(model, n).weight.abs() < threshold).sum()) for n in ("q", "v"))
    built, expected, _, _ = build({"sara_threshold": threshold}, model=model)
    trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    assert trainable == expected == counted > 0
    assert SaraAdapter().layer_trainable(64, 32, SaraParams(sara_per_mille=100)) == share_count(64, 32, 100) == 204
    with pytest.raises(ConfigError, match="sara_threshold"):
        SaraAdapter().layer_trainable(64, 32, SaraParams(sara_threshold=0.1))
    with pytest.raises(ConfigError, match="sara_threshold=null"):
        SaraAdapter().size_limit([(64, 32)], SaraParams(sara_threshold=0.1))
    assert SaraAdapter().size_limit([(64, 32)], SaraParams()) == 1000


def test_save_and_load_keep_the_values_and_the_training_mask(tmp_path):
    built, x = reselect_case("restart")
    for t in range(1, 4):
        step(built, x, t)
    assert all(not bool(m.sara_active.all()) for m in adapter_layers(built.model).values())
    path = tmp_path / "sara.safetensors"
    save_trainable(built.model, path)
    fresh, _, _, _ = build(RESELECT, model=Net(scale=0.02))
    load_trainable(fresh.model, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x), built.model(x), rtol=0, atol=0)
    for a, b in zip(adapter_layers(fresh.model).values(), adapter_layers(built.model).values()):
        assert torch.equal(a.sara_active, b.sara_active) and torch.equal(a.sara_index, b.sara_index)


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D in miniature (the name is what lorabench recognises): y = x W + b, W d_in x d_out."""

    def __init__(self, d_out: int, d_in: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(d_in, d_out, generator=gen))
        self.bias = nn.Parameter(torch.randn(d_out, generator=gen))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_gpt2_conv1d_targets_are_selected_on_their_d_out_x_d_in_view():
    """GPT-2's c_attn stores W as d_in x d_out: Omega indexes the (d_out, d_in) view; merging writes through."""
    model = nn.Sequential()
    model.add_module("c_attn", Conv1D(12, 4))
    conv = model.c_attn
    w_view = conv.weight.detach().T.clone()  # 12 x 4
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x)
    adapter, params = SaraAdapter(), SaraParams(sara_per_mille=250)
    ctx = MethodContext(["c_attn"], "causal_lm", 1e-3, 0.0, 10, 0)
    assert adapter.expected_trainable(model, params, ctx) == 12
    model = adapter.apply(model, params, ctx, {})
    layer = adapter_layers(model)["c_attn"]
    assert torch.equal(layer.sara_index, select(w_view, params)[0])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)  # F.linear on the view vs x @ W
        layer.sara_value.add_(0.5)
        out = model(x)
        torch.testing.assert_close(out, x @ (w_view + layer.delta_weight()).T + conv.bias, rtol=0, atol=1e-6)
        delta = layer.delta_weight().clone()
        layer.merge()
        torch.testing.assert_close(model(x), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(conv.weight.detach(), (w_view + delta).T)


# -- the procedure --------------------------------------------------------------------------------------
def test_the_values_step_in_their_own_group_with_the_runs_weight_decay():
    built, _, _, _ = build(weight_decay=0.1, head="classification")
    values = {id(m.sara_value) for m in adapter_layers(built.model).values()}
    groups = built.optimizer.param_groups
    assert {id(p) for p in groups[-1]["params"]} == values and groups[-1]["weight_decay"] == 0.1
    assert all(id(p) not in values for g in groups[:-1] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in built.model.parameters() if p.requires_grad)


def test_the_nuclear_norm_gradient_is_lambda_u_vt_of_the_trained_weights_on_the_mask():
    model = Net(q_shape=(5, 6), v_shape=(6, 5))
    built, _, _, _ = build({"sara_per_mille": 500, "sara_rank_min_dim": 0, "sara_rank_min_entries": 0}, model=model)
    proc = built.procedure
    proc.rng.choice = lambda seq: "q"  # the draw is tested below; here the layer is fixed
    layer = built.model.q
    with torch.no_grad():
        layer.sara_value.add_(0.1 * torch.randn(15, generator=torch.Generator().manual_seed(5)))  # trained a bit
        layer.sara_active[:3] = False  # as if re-selected: M drops three entries

    def u_vt_on_support(values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(30)
        dense[layer.sara_index] = values
        u, _, vh = torch.linalg.svd(dense.view(5, 6), full_matrices=False)
        return (u @ vh).flatten()[layer.sara_index]

    active = layer.sara_active
    expected = 5e-4 * u_vt_on_support(layer.sara_value.detach() * active) * active
    proc.add_rank_gradient()
    torch.testing.assert_close(layer.sara_value.grad, expected, rtol=1e-5, atol=1e-9)
    assert built.model.v.sara_value.grad is None  # one layer per step
    masked = torch.zeros(30)
    masked[layer.sara_index] = layer.sara_value.detach() * active
    assert proc.rank_term == pytest.approx(5e-4 * torch.linalg.svdvals(masked.view(5, 6)).sum().item(), rel=1e-5)
    # perturbed rules the check tells apart: the nuclear norm of Delta W, or of every selected entry
    of_delta = 5e-4 * u_vt_on_support((layer.sara_value - layer.sara_w0).detach() * active) * active
    of_all = 5e-4 * u_vt_on_support(layer.sara_value.detach())
    for wrong in (of_delta, of_all):
        assert (wrong - expected).abs().max() > 1e-5


def test_the_nuclear_norm_draws_among_wide_layers_with_enough_entries():
    def model():
        return Net(q_shape=(5, 6), v_shape=(8, 5))

    built, _, _, _ = build({"sara_per_mille": 500, "sara_rank_min_dim": 4, "sara_rank_min_entries": 15}, model=model())
    proc = built.procedure
    assert proc.rank_layers == ["q", "v"]  # min(5, 6) = 5 > 4 and min(8, 5) = 5 > 4
    for name in ("q", "v"):  # q selects 15 entries (not > 15): drawn but skipped; v selects 20
        proc.rng.choice = lambda seq, name=name: name
        proc.add_rank_gradient()
    assert built.model.q.sara_value.grad is None and built.model.v.sara_value.grad is not None
    built, _, _, _ = build({"sara_per_mille": 500, "sara_rank_min_dim": 5}, model=model())
    assert built.procedure.rank_layers == []  # 5 is not > 5
    built.procedure.add_rank_gradient()  # nothing to draw: no error, no gradient
    assert all(m.sara_value.grad is None for m in adapter_layers(built.model).values())
    proc = build({"sara_rank_min_dim": 0, "sara_rank_min_entries": 0}, model=model())[0].procedure
    for _ in range(40):
        proc.add_rank_gradient()
    import random

    rng = random.Random(0)  # random.Random(run seed).choice over the layers in module order
    picks = [rng.choice(["q", "v"]) for _ in range(40)]
    assert proc.draws == {"q": picks.count("q"), "v": picks.count("v")}


RESELECT = {"sara_per_mille": 500, "sara_progressive_step": 1, "sara_lambda_rank": 0.0}


def reselect_case(mode: str, weight_decay: float = 0.0):
    """Weights N(0, 0.02^2): the bound (the median |W0|) is ~0.013, so Adam's first step of ~lr = 1e-2
    takes some selected entries past it and leaves others under it."""
    built, _, _, _ = build({**RESELECT, "sara_reselect": mode}, model=Net(scale=0.02), weight_decay=weight_decay)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    step(built, x, 0)  # one step: every value moved by ~lr = 1e-2 (Adam's first step)
    return built, x


@pytest.mark.parametrize("mode", ["restart", "continue"])
def test_the_reselection_keeps_the_entries_still_under_the_bound(mode):
    built, x = reselect_case(mode)
    layers = list(adapter_layers(built.model).values())
    still = [(m.sara_value.detach().abs() < m.sara_bound) for m in layers]
    assert all(0 < int(s.sum()) < s.numel() for s in still), "the case must drop some entries and keep some"
    values = [m.sara_value.detach().clone() for m in layers]
    steps_taken = {id(m.sara_value): int(built.optimizer.state[m.sara_value]["step"]) for m in layers}
    built.model(x).square().sum().backward()
    built.procedure.after_backward(1)  # the step after the first P = 1 steps
    for m, s in zip(layers, still):
        assert torch.equal(m.sara_active, s)
    if mode == "restart":  # optim/adamw.py: fresh state and no update at this step
        assert all(m.sara_value.grad is None and m.sara_value not in built.optimizer.state for m in layers)
    else:  # optim/adamw2.py: the state carries on; frozen entries get no gradient
        assert all(torch.count_nonzero(m.sara_value.grad[~m.sara_active]) == 0 for m in layers)
    built.optimizer.step()
    built.optimizer.zero_grad(set_to_none=True)
    built.procedure.on_step_end(2)
    for m, v, s in zip(layers, values, still):
        if mode == "restart":
            assert torch.equal(m.sara_value.detach(), v) and m.sara_value not in built.optimizer.state
        else:
            assert torch.equal(m.sara_value.detach()[~s], v[~s])  # frozen, despite their old moments
            assert not torch.equal(m.sara_value.detach()[s], v[s])
            assert int(built.optimizer.state[m.sara_value]["step"]) == steps_taken[id(m.sara_value)] + 1
    frozen = [m.sara_value.detach()[~s].clone() for m, s in zip(layers, still)]
    for t in (2, 3):
        step(built, x, t)
    for m, s, f in zip(layers, still, frozen):
        assert torch.equal(m.sara_value.detach()[~s], f)  # learned values stay in W, frozen
        assert torch.equal(m.sara_active, s)  # re-selected once only
    if mode == "restart":  # the state restarted at step 3: two steps since
        assert all(int(built.optimizer.state[m.sara_value]["step"]) == 2 for m in layers)


def test_the_restart_step_draws_no_layer_and_moves_nothing():
    """optim/adamw.py returns from that step before its nuclear norm: no draw, no update from the term either."""
    overrides = {**RESELECT, "sara_lambda_rank": 0.5, "sara_rank_min_dim": 0, "sara_rank_min_entries": 0}
    built, _, _, _ = build(overrides, model=Net(scale=0.02))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    step(built, x, 0)
    assert sum(built.procedure.draws.values()) == 1
    values = [m.sara_value.detach().clone() for m in adapter_layers(built.model).values()]
    step(built, x, 1)  # the re-selection step
    assert sum(built.procedure.draws.values()) == 1
    assert all(torch.equal(m.sara_value, v) for m, v in zip(adapter_layers(built.model).values(), values))
    step(built, x, 2)
    assert sum(built.procedure.draws.values()) == 2


def test_frozen_entries_stay_frozen_under_weight_decay():
    built, x = reselect_case("continue", weight_decay=0.5)
    step(built, x, 1)
    layers = list(adapter_layers(built.model).values())
    frozen = [m.sara_value.detach()[~m.sara_active].clone() for m in layers]
    assert all(f.numel() for f in frozen)
    for t in range(2, 5):
        step(built, x, t)
    assert all(torch.equal(m.sara_value.detach()[~m.sara_active], f) for m, f in zip(layers, frozen))


def test_the_procedure_state_round_trips_through_json():
    built, x = reselect_case("restart")
    step(built, x, 1)
    saved = json.loads(json.dumps(built.procedure.state_dict()))
    fresh, _, _, _ = build(RESELECT, model=Net(scale=0.02))
    fresh.procedure.load_state_dict(saved)
    assert fresh.procedure.reselected
    for a, b in zip(adapter_layers(fresh.model).values(), adapter_layers(built.model).values()):
        assert torch.equal(a.sara_active, b.sara_active) and not bool(a.sara_active.all())
    assert fresh.procedure.rng.random() == built.procedure.rng.random()
    report = built.procedure.state()
    assert report["sara_reselected"] and report["sara_selected"] == {"q": 15, "v": 15}
    assert report["sara_training"] == {n: int(m.sara_active.sum()) for n, m in adapter_layers(built.model).items()}


def test_the_step_of_the_reselection_follows_the_fraction_or_the_step():
    assert SaraProgressiveParams().reselect_after(5005) == 2502
    assert SaraProgressiveParams(sara_progressive_step=2500).reselect_after(5005) == 2500
    assert SaraProgressiveParams(sara_progressive_fraction=None).reselect_after(100) is None
    assert SaraProgressiveParams(sara_progressive_fraction=0.01).reselect_after(10) == 1


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("sara_per_mille", 0, "1..1000"),
        ("sara_per_mille", 1001, "1..1000"),
        ("sara_threshold", -1e-3, "sara_threshold"),
        ("sara_lambda_rank", -1.0, "sara_lambda_rank"),
        ("sara_progressive_fraction", 1.0, r"\(0, 1\)"),
        ("sara_progressive_step", 0, "sara_progressive_step"),
        ("sara_reselect", "keep", "restart, continue"),
    ],
)
def test_invalid_values_are_refused_with_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        resolve_method({**PRESET, key: value})


def test_the_procedure_needs_the_sara_adapter():
    with pytest.raises(ConfigError, match="needs method.adapter"):
        resolve_method({**PRESET, "adapter": "lora"})


@pytest.mark.slow
def test_a_run_resumed_after_the_reselection_is_bitwise_equal(sst2_dir, tmp_path, monkeypatch):
    """The re-selection happens in the third step, the cut after it: the resumed run needs the frozen entries
    (the procedure's state) and the draw generator back. tiny_bert's 32 x 32 targets take the nuclear norm."""
    from safetensors.torch import load_file

    from lorabench.checkpoint import list_checkpoints
    from tests.test_resume import run_pair

    extra = [
        "method.sara_progressive_step=2",
        "method.sara_rank_min_dim=0",
        "method.sara_lambda_rank=0.05",
        "method.lr=0.01",
    ]
    a_dir, b_dir = run_pair("sara", sst2_dir, tmp_path, monkeypatch, *extra)
    a, b = (json.loads((d / "record.json").read_text()) for d in (a_dir, b_dir))
    assert b["status"] == "completed" and b["resumed_from"][0]["step"] == 3
    assert a["train_log"] == b["train_log"] and a["metrics"]["final"] == b["metrics"]["final"]
    assert a["method_report"]["sara_reselected"] and a["method_report"] == b["method_report"]
    assert a["method_report"]["sara_rank_term"] is not None  # the step pre-hook runs inside the loop's step
    assert any(a["method_report"]["sara_training"][n] < k for n, k in a["method_report"]["sara_selected"].items())
    wa = load_file(str(list_checkpoints(a_dir)[-1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(b_dir)[-1] / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
