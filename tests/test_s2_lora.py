"""S2-LoRA's rules (lorabench/methods/adapters/s2_lora.py, no authors' code: fidelity ``rule``) on a toy
model with targets of two shapes: one (A, B) per shape shared by every target of that shape, a
coefficient vector c_l per target, Delta W_l = s B diag(c_l) A, the count (shared tensors once), zero
initial delta, forward = delta_weight, merging, saving and loading, and the ``s2_lora_l1`` term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.method_params.adapters_s2_lora import S2LoraParams
from lorabench.method_params.registry import PARAMS
from lorabench.method_params.regularizers_s2_lora import S2LoraL1Params
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable, trainable_state_dict
from lorabench.methods.adapters.s2_lora import S2LoraAdapter, S2LoraLayer
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import fidelity_of
from lorabench.methods.regularizers.s2_lora_l1 import S2LoraL1
from lorabench.registry import ADAPTERS, REGULARIZERS

TARGETS = ["q", "v", "up"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.up = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 10)

    def forward(self, x):
        return self.up(torch.tanh(self.q(x) + self.v(x)))


class Toy(nn.Module):
    """Two blocks: four 6 x 6 targets (q, v) and two 10 x 6 ones (up); ``other`` is not targeted."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.other = nn.Linear(10, 6)

    def forward(self, x):
        for block in self.blocks:
            x = self.other(block(x))
        return x


def ctx(seed: int = 0) -> MethodContext:
    return MethodContext(TARGETS, "causal_lm", 1e-3, 0.0, 1, seed)


def wrapped(seed: int = 0, model_seed: int = 0, **params):
    torch.manual_seed(model_seed)
    base = Toy().double()
    params = S2LoraParams(rank=3, alpha=6.0, **params)
    model = S2LoraAdapter().apply(base, params, ctx(seed), {})
    return model, params


def perturb(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_registered_with_a_rule_fidelity_and_its_regularizer():
    assert ADAPTERS.get("s2_lora") is S2LoraAdapter and REGULARIZERS.get("s2_lora_l1") is S2LoraL1
    assert fidelity_of(S2LoraAdapter).status == "rule" and fidelity_of(S2LoraL1).status == "rule"
    assert PARAMS["regularizer"].get("s2_lora_l1").requires_adapter == ("s2_lora",)
    assert S2LoraL1.requires_adapter == ("s2_lora",)


def test_one_pair_per_shape_shared_by_every_target_of_that_shape():
    model, params = wrapped()
    layers = adapter_layers(model)
    assert len(layers) == 6 and all(isinstance(m, S2LoraLayer) for m in layers.values())
    assert all(m.scale == pytest.approx(6.0 / 3) for m in layers.values())  # s = alpha / r
    square = [m for n, m in layers.items() if n.endswith((".q", ".v"))]
    wide = [m for n, m in layers.items() if n.endswith(".up")]
    for group, (d_out, d_in) in ((square, (6, 6)), (wide, (10, 6))):
        assert all(m.s2_A is group[0].s2_A and m.s2_B is group[0].s2_B for m in group)
        assert group[0].s2_A.shape == (3, d_in) and group[0].s2_B.shape == (d_out, 3)
    assert square[0].s2_A is not wide[0].s2_A and square[0].s2_B is not wide[0].s2_B
    coefs = [m.s2_coef for m in layers.values()]
    assert len({id(c) for c in coefs}) == 6 and all(c.shape == (3,) for c in coefs)
    model.to(torch.float32)  # a dtype move keeps the sharing (Parameters are updated in place)
    assert all(m.s2_A is square[0].s2_A for m in square) and square[0].s2_A.dtype == torch.float32


@pytest.mark.parametrize("train_shared", [True, False])
def test_trainable_count_counts_shared_tensors_once(train_shared):
    torch.manual_seed(0)
    base = Toy().double()
    params = S2LoraParams(rank=3, alpha=6.0, s2_train_shared=train_shared)
    adapter = S2LoraAdapter()
    expected = adapter.expected_trainable(base, params, ctx())
    model = adapter.apply(base, params, ctx(), {})
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() skips repeats
    # by hand: 6 targets x r coefficients, plus r (6 + 6) for the 6 x 6 pair and r (6 + 10) for the 10 x 6 pair
    by_hand = 6 * 3 + (3 * 12 + 3 * 16 if train_shared else 0)
    assert count == expected == by_hand
    assert adapter.layer_trainable(10, 6, params) == 3
    assert adapter.shared_trainable(10, 6, params) == (48 if train_shared else 0)


def test_zero_delta_at_init_and_the_shared_factors_are_random():
    model, _ = wrapped()
    torch.manual_seed(0)
    base = Toy().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(layer.delta_weight()) == 0 and torch.count_nonzero(layer.s2_coef) == 0
        assert layer.s2_A.abs().min() > 0 and layer.s2_B.abs().min() > 0  # c gets a non-zero first gradient
        assert 0.005 < float(layer.s2_A.detach().std()) < 0.05


def test_first_gradient_reaches_only_the_coefficients():
    """dL/dc = s diag(B^T G A^T) != 0 while A and B get 0 (their gradients carry diag(c) = 0)."""
    model, _ = wrapped()
    model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
    for layer in adapter_layers(model).values():
        assert layer.s2_coef.grad.abs().max() > 0
        assert layer.s2_A.grad.abs().max() == 0 and layer.s2_B.grad.abs().max() == 0


def test_the_update_rule_by_hand():
    """A 2 x 3 layer, r = 2, s = alpha / r = 1.5: Delta W = s B diag(c) A entry by entry."""
    a = nn.Parameter(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64))
    layer = S2LoraLayer(nn.Linear(3, 2).double(), a, b, scale=1.5)
    with torch.no_grad():
        layer.s2_coef.copy_(torch.tensor([2.0, -1.0]))
    # B diag(c) = [[2, -2], [6, 1]];  (B diag(c)) A = [[2, 2, 2], [6, -1, 13]]
    want = 1.5 * torch.tensor([[2.0, 2.0, 2.0], [6.0, -1.0, 13.0]], dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), want, rtol=0, atol=1e-12)
    x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(layer(x) - layer.base(x), x @ want.T, rtol=0, atol=1e-12)


def test_forward_contribution_is_delta_weight_and_merging_keeps_the_output():
    model, _ = wrapped()
    perturb(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    layers = adapter_layers(model)
    for layer in layers.values():
        h = torch.randn(5, layer.in_features, dtype=torch.float64)
        want = layer.scale * layer.s2_B @ torch.diag(layer.s2_coef) @ layer.s2_A
        torch.testing.assert_close(layer.delta_weight(), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer(h) - layer.base(h), h @ want.T, rtol=1e-12, atol=1e-12)
    out = model(x).detach()
    weights = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    for layer in layers.values():  # one after another: the shared factors must stay untouched by a merge
        layer.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
    for layer in layers.values():
        layer.unmerge()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base.weight, weights[name], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)


def test_the_shared_gradient_is_the_sum_over_the_layers_using_it():
    """One shared A (the q, v layers') gets the sum of the gradients that private copies would get."""
    model, _ = wrapped()
    perturb(model)
    square = [m for n, m in adapter_layers(model).items() if n.endswith((".q", ".v"))]
    x = torch.randn(4, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    shared_grad = square[0].s2_A.grad.clone()
    copies = []
    for layer in square:  # a private copy of A in every layer: the same function, four tensors
        layer.s2_A = nn.Parameter(layer.s2_A.detach().clone())
        copies.append(layer.s2_A)
    model(x).square().sum().backward()
    assert all(c.grad.abs().max() > 0 for c in copies)
    torch.testing.assert_close(shared_grad, sum(c.grad for c in copies), rtol=1e-10, atol=1e-12)


def test_save_and_load_store_each_shared_tensor_once(tmp_path):
    model, _ = wrapped(seed=0)
    perturb(model)
    saved = trainable_state_dict(model)
    assert sum(k.endswith(".s2_A") for k in saved) == 2 and sum(k.endswith(".s2_B") for k in saved) == 2
    assert sum(k.endswith(".s2_coef") for k in saved) == 6
    path = tmp_path / "adapter.safetensors"
    save_trainable(model, path)
    other, _ = wrapped(seed=1)  # another seed: other shared draws, restored from the file
    x = torch.randn(3, 6, dtype=torch.float64)
    assert not torch.allclose(other(x), model(x))
    load_trainable(other, path)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-12)
    square = [m for n, m in adapter_layers(other).items() if n.endswith((".q", ".v"))]
    assert all(m.s2_A is square[0].s2_A for m in square)  # still one tensor after loading


def test_frozen_shared_factors_regenerate_from_the_seed():
    first, _ = wrapped(seed=3, s2_train_shared=False)
    second, _ = wrapped(seed=3, s2_train_shared=False)
    assert not any(k.endswith((".s2_A", ".s2_B")) for k in trainable_state_dict(first))
    for a, b in zip(adapter_layers(first).values(), adapter_layers(second).values()):
        torch.testing.assert_close(a.s2_A, b.s2_A, rtol=0, atol=0)


def test_l1_term_is_lambda_times_the_sum_of_absolute_coefficients():
    model, _ = wrapped()
    layers = list(adapter_layers(model).values())
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.s2_coef.copy_(torch.tensor([i - 1.0, 0.5, -2.0]))
    reg = S2LoraL1()
    reg.setup(model, None, S2LoraL1Params(s2_l1_weight=0.1), ctx())
    terms = reg.loss_terms(model, {}, None)
    # |i - 1| over i = 0..5 is 1 + 0 + 1 + 2 + 3 + 4 = 11; plus 6 x (0.5 + 2)
    assert set(terms) == {"l1"} and float(terms["l1"].detach()) == pytest.approx(0.1 * (11 + 6 * 2.5))
    terms["l1"].backward()
    for layer in layers:
        torch.testing.assert_close(layer.s2_coef.grad, 0.1 * torch.sign(layer.s2_coef.detach()))
        assert layer.s2_A.grad is None and layer.s2_B.grad is None  # no penalty on the shared factors
    assert reg.state() == {"weight": 0.1, "coefficients": 18, "last_l1": pytest.approx(0.1 * 26)}


def test_l1_term_needs_s2_lora_layers():
    from lorabench.errors import ConfigError

    with pytest.raises(ConfigError, match="no s2_lora layer"):
        S2LoraL1().setup(Toy(), None, S2LoraL1Params(), ctx())


def test_s2_lora_trains_in_the_loop_with_its_l1_term_logged(tmp_path, sst2_dir):
    """The preset end to end on the tiny model: the term is 0 at the start (c = 0) and grows, the
    recorded trainable count equals the closed form, and the saved adapter reloads."""
    import json

    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    overrides = tiny_overrides("classification", sst2_dir, tmp_path, "train.max_steps=3")
    code = train("method=s2_lora", *overrides, "train.log_every=1")
    assert code == 0
    run_dir = only_run_dir(tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed"
    terms = [entry["terms"] for entry in record["train_log"]]
    assert terms[0] == {"l1": 0.0} and terms[-1]["l1"] > 0
    assert record["cost"]["trainable_params"] == record["cost"]["expected_trainable_params"]
    assert record["method_report"]["regularizer"]["weight"] == pytest.approx(1e-4)
    assert list(run_dir.glob("**/*.safetensors")), "no adapter file written"
