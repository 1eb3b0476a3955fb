"""CoDyRA's rules: the layer (lorabench/methods/adapters/codyra.py), Delta W = B diag(g) A with no scale on a
frozen W0, and the ``codyra`` procedure (lorabench/methods/procedures/codyra.py), the authors' threshold
schedule and their shift-then-zero threshold on the gates after each optimizer step.

Shapes and the trainable count against ``expected_trainable``, Delta W = 0 at step 0, ``delta_weight()``
equal to the forward's contribution and merge equal to the forward, a case computed by hand (output and
gradients, g included), save/load, bf16 autocast, the schedule and the threshold computed by hand (each
a rule a changed detail would break), the trained ranks reaching ``state()`` after steps on a tiny model,
checkpoint state, and the Params checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_codyra import CodyraParams, CodyraThresholdParams
from lorabench.method_params.check import check_method
from lorabench.methods.adapters.codyra import CodyraAdapter, CodyraLayer
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable
from lorabench.methods.base import MethodContext
from lorabench.methods.catalog import load_presets
from lorabench.methods.procedures.codyra import CodyraThreshold, ThresholdSchedule
from tests.conftest import CONF_DIR
from tests.method_harness import TwoLinears, one_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ctx(seed: int = 0, max_steps: int = 20) -> MethodContext:
    return MethodContext(["q", "v"], "causal_lm", 1e-3, 0.0, max_steps, seed)


def wrapped(seed: int = 0, **overrides) -> tuple[nn.Module, nn.Module, CodyraParams]:
    params = CodyraParams(**overrides)
    return TwoLinears(), CodyraAdapter().apply(TwoLinears(), params, ctx(seed), {}), params


def perturb(model: nn.Module, seed: int = 1, size: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=gen))


def procedure_on(model: nn.Module, max_steps: int = 20, **overrides) -> CodyraThreshold:
    proc = CodyraThreshold()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    proc.setup(model, opt, CodyraThresholdParams(**overrides), ctx(max_steps=max_steps))
    return proc


def test_shapes_and_trainable_count():
    base, model, params = wrapped(rank=3)
    layers = adapter_layers(model)
    assert sorted(layers) == ["q", "v"]
    for layer in layers.values():
        assert layer.lora_A.shape == (3, 24) and layer.lora_B.shape == (layer.out_features, 3)
        assert layer.gate.shape == (3,) and layer.gate.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.{n}" for t in ("q", "v") for n in ("lora_A", "lora_B", "gate")}
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == CodyraAdapter().expected_trainable(base, params, ctx()) == 3 * (24 + 16 + 1) + 3 * (24 + 40 + 1)


def test_zero_delta_at_step_zero_and_the_authors_init():
    base, model, _ = wrapped(rank=16)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(layer.delta_weight()) == 0 and torch.count_nonzero(layer.lora_B) == 0
        bound = 1 / layer.in_features**0.5  # Kaiming uniform, a = sqrt(5)
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
        assert torch.count_nonzero(layer.gate) == 16 and layer.gate.abs().max() > 0.5  # N(0, 1), not ones
        assert layer.active_rank() == 16
    _, again, _ = wrapped(rank=16)
    _, other, _ = wrapped(seed=1, rank=16)
    assert torch.equal(again.q.gate, model.q.gate) and not torch.equal(other.q.gate, model.q.gate)


def test_delta_weight_is_the_forward_contribution_and_merge_keeps_the_output():
    _, model, _ = wrapped(rank=4)
    perturb(model)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    for layer in adapter_layers(model).values():
        torch.testing.assert_close(layer(x) - layer.base(x), x @ layer.delta_weight().T, rtol=1e-5, atol=1e-6)
        expected = layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A  # no alpha / r
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-6, atol=1e-7)
    before = model(x).detach()
    for layer in adapter_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_case_computed_by_hand():
    """W0 = 0 (2 x 3), r = 2, A = [[1, 0, -1], [0, 2, 0]], g = [3, -1], B = [[1, 0], [2, 1]]:
    Delta W = B diag(g) A = [[3, 0, -3], [6, -2, -6]]; x = [1, 1, 1] gives h = [0, -2] (+ b0 = [1, -1])."""
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.copy_(torch.tensor([1.0, -1.0]))
    a = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    layer = CodyraLayer(base.requires_grad_(False), a, b, torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(
        layer.delta_weight(), torch.tensor([[3.0, 0.0, -3.0], [6.0, -2.0, -6.0]]), rtol=0, atol=0
    )
    out = layer(torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -3.0]]), rtol=0, atol=0)
    (out * torch.tensor([[1.0, 10.0]])).sum().backward()
    # u = A x = [0, 2], v = B^T dL/dh = [21, 10]: dL/dg = u * v = [0, 20]
    torch.testing.assert_close(layer.gate.grad, torch.tensor([0.0, 20.0]), rtol=0, atol=0)
    # dL/dB = dL/dh (g * u)^T = [[0, -2], [0, -20]]; dL/dA = (g * v) x^T = [[63] * 3, [-10] * 3]
    torch.testing.assert_close(layer.lora_B.grad, torch.tensor([[0.0, -2.0], [0.0, -20.0]]), rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_A.grad, torch.tensor([[63.0] * 3, [-10.0] * 3]), rtol=0, atol=0)
    with pytest.raises(ValueError):
        CodyraLayer(base, a, b, torch.tensor([[3.0, -1.0]]))  # the gate is 1-D here


def test_save_load_round_trip(tmp_path):
    _, one, _ = wrapped(rank=4)
    perturb(one)
    with torch.no_grad():
        one.q.gate[1] = 0.0
    save_trainable(one, tmp_path / "a.safetensors")
    _, again, _ = wrapped(seed=5, rank=4)
    load_trainable(again, tmp_path / "a.safetensors")
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(again(x), one(x), rtol=0, atol=0)
    assert again.q.active_rank() == 3


def test_bf16_autocast_keeps_the_update_apart_from_w0():
    base = nn.Linear(24, 16).requires_grad_(False)
    with torch.no_grad():
        base.weight.mul_(100.0)
    layer = CodyraAdapter().make_layer("q", base, CodyraParams(rank=8), ctx())
    perturb(layer, size=1e-3)
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ layer.delta_weight().double().T
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp = layer.adapter_forward(x).double()
    assert (amp - exact).norm() <= (0.01 + 2**-8) * exact.norm()


# ----------------------------------------------------------------------------- the procedure


def test_schedule_computed_by_hand():
    """T = 20, dense 0.5, 5 values up to 0.4: D = 10, L = int(10 // 5) = 2, thresholds 0, .1, .2, .3, .4;
    the index rises at iterations 10, 12, 14, 16 (and 18, clipped); thresholding after iterations > 10."""
    s = ThresholdSchedule(20, CodyraThresholdParams(max_kappa=0.4, lambda_num=5, dense_fraction=0.5))
    assert (s.dense, s.every) == (10.0, 2)
    expected = [0.0] * 10 + [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4]
    assert [s.threshold(i) for i in range(20)] == pytest.approx(expected, abs=1e-15)
    assert [s.prunes(i) for i in range(20)] == [False] * 11 + [True] * 9
    # no dense phase: T = 8, 4 values up to 0.3, L = 2: the index rises at 0, 2, 4, 6; thresholding from 1
    s = ThresholdSchedule(8, CodyraThresholdParams(max_kappa=0.3, lambda_num=4, dense_fraction=0.0))
    assert [s.threshold(i) for i in range(8)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3], abs=1e-15)
    assert [s.prunes(i) for i in range(8)] == [False] + [True] * 7
    # a fractional D: T = 25, dense 0.3 -> D = 7.5, L = int(17.5 // 5) = 3: the first rise at 9, not 7.5 or 6
    s = ThresholdSchedule(25, CodyraThresholdParams(max_kappa=0.4, lambda_num=5, dense_fraction=0.3))
    assert s.every == 3 and [s.index(i) for i in (8, 9, 11, 12, 21, 24)] == [0, 1, 1, 2, 5, 6]
    assert not s.prunes(7) and s.prunes(8)
    # a run shorter than D + lambda_num: L = 0, the threshold stays 0 (the authors' preset over 12 steps)
    s = ThresholdSchedule(12, CodyraThresholdParams())
    assert s.every == 0 and {s.threshold(i) for i in range(12)} == {0.0}


def test_threshold_shifts_then_zeroes_the_gates():
    """At step 13 (iteration 12) of the schedule above tau = 0.2: g > tau loses tau, g < -tau gains tau,
    then |g| < tau is zeroed, so 0.3 -> 0.1 -> 0 (a soft threshold would leave 0.1)."""
    _, model, _ = wrapped(rank=8)
    proc = procedure_on(model, max_steps=20, max_kappa=0.4, lambda_num=5, dense_fraction=0.5)
    gates = torch.tensor([0.9, 0.3, -0.35, 0.1, -0.5, 0.0, 0.21, -0.19])
    with torch.no_grad():
        model.q.gate.copy_(gates)
        model.v.gate.copy_(-gates)
    proc.on_step_end(11)  # iteration 10 = D: no threshold yet (their "iteration > dense_iters")
    assert torch.equal(model.q.gate, gates) and proc.current_threshold == pytest.approx(0.1)
    proc.on_step_end(13)
    tau = torch.tensor(0.2)
    expected = torch.tensor([0.9 - tau, 0.0, 0.0, 0.0, -0.5 + tau, 0.0, 0.0, 0.0])
    torch.testing.assert_close(model.q.gate, expected, rtol=0, atol=0)
    torch.testing.assert_close(model.v.gate, -expected, rtol=0, atol=0)
    state = proc.state()
    assert state["codyra_ranks"] == {"q": 2, "v": 2} and state["codyra_active_ranks"] == 4
    assert state["codyra_zero_rank_share"] == pytest.approx(12 / 16)
    assert state["codyra_threshold"] == pytest.approx(0.2)
    assert (state["codyra_dense_steps"], state["codyra_threshold_every"]) == (10.0, 2)


def test_checkpoint_state_round_trips():
    _, model, _ = wrapped(rank=2)
    proc = procedure_on(model, max_steps=20, max_kappa=0.4, lambda_num=5, dense_fraction=0.5)
    proc.on_step_end(15)
    again = procedure_on(model, max_steps=20, max_kappa=0.4, lambda_num=5, dense_fraction=0.5)
    again.load_state_dict(proc.state_dict())
    assert again.state() == proc.state() and again.state_dict() == {"threshold": pytest.approx(0.3), "steps_done": 15}


def test_trained_ranks_reach_the_report(sst2_dir, tmp_path):
    """The preset on the tiny model, 6 steps thresholding from the second (tau 0.2, dense 0): every target
    reports its active rank, some ranks survive and most do not."""
    result = one_step(
        "codyra",
        sst2_dir,
        tmp_path,
        "train.max_steps=6",
        "method.rank=4",
        "method.max_kappa=0.2",
        "method.lambda_num=2",
        "method.dense_fraction=0.0",
        steps=6,
    )
    proc, layers = result.built.procedure, adapter_layers(result.built.model)
    state = proc.state()
    assert set(state["codyra_ranks"]) == set(layers) and layers
    assert state["codyra_ranks"] == {name: m.active_rank() for name, m in layers.items()}
    assert 0 < state["codyra_active_ranks"] < 4 * len(layers) / 2 and state["codyra_threshold"] == pytest.approx(0.2)
    assert sum(result.after[n].numel() for n in result.trainable) == result.expected_trainable


def test_procedure_needs_codyra_layers():
    with pytest.raises(ValueError, match="no CoDyRA layers"):
        CodyraThreshold().setup(
            TwoLinears(), torch.optim.SGD(TwoLinears().parameters(), lr=0.1), CodyraThresholdParams(), ctx()
        )
    raw = {**load_presets(CONF_DIR / "method")["codyra"], "adapter": "lora"}
    with pytest.raises(ConfigError, match="needs method.adapter"):
        check_method(raw)


@pytest.mark.parametrize(
    "cls, bad",
    [
        (CodyraParams, {"rank": 0}),
        (CodyraThresholdParams, {"max_kappa": -0.1}),
        (CodyraThresholdParams, {"lambda_num": 0}),
        (CodyraThresholdParams, {"dense_fraction": 1.0}),
        (CodyraThresholdParams, {"dense_fraction": -0.5}),
        (CodyraThresholdParams, {"max_kappa": float("nan")}),
    ],
)
def test_params_refuse_bad_values(cls, bad):
    with pytest.raises(ConfigError, match="method."):
        cls(**bad)


def test_preset_defaults_are_the_authors():
    raw = load_presets(CONF_DIR / "method")["codyra"]
    checked = check_method(raw)
    assert checked.params["adapter"] == CodyraParams(rank=16)
    assert checked.params["procedure"] == CodyraThresholdParams(max_kappa=0.005, lambda_num=50, dense_fraction=0.5)
    assert (raw["beta1"], raw["beta2"], raw["lr"]) == (0.9, 0.9999, None)
