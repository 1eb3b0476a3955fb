"""SLTrain's rule (lorabench/methods/adapters/sltrain.py): Delta W = (alpha / r) B A + S, S on a random
fixed support of int(delta d_out d_in) flat indices whose values alone train, on a frozen W0.

Shapes and the support, the trainable count against ``expected_trainable``, Delta W = 0 at step 0 (B = 0
and S = 0), ``delta_weight()`` equal to the forward's contribution, merge equal to the forward, a case
computed by hand, the values' gradient as dL/dW on the support, the support regenerating from the seed
(not saved), and the Params checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_sltrain import SltrainParams
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable, trainable_state_dict
from lorabench.methods.adapters.sltrain import SltrainAdapter, SparseLowRankLayer, draw_support, support_size
from lorabench.methods.base import MethodContext
from tests.method_harness import TwoLinears


def ctx(seed: int = 0) -> MethodContext:
    return MethodContext(["q", "v"], "causal_lm", 1e-3, 0.0, 1, seed)


def wrapped(seed: int = 0, **overrides) -> tuple[nn.Module, nn.Module, SltrainParams]:
    base = TwoLinears()
    params = SltrainParams(**overrides)
    model = SltrainAdapter().apply(TwoLinears(), params, ctx(seed), {})
    return base, model, params


def perturb(model: nn.Module, seed: int = 1, size: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=gen))


def test_shapes_support_and_trainable_count():
    base, model, params = wrapped(rank=3, sltrain_density=0.1)
    layers = adapter_layers(model)
    assert sorted(layers) == ["q", "v"]
    for layer in layers.values():
        d_out, d_in = layer.out_features, layer.in_features
        nnz = int(0.1 * d_out * d_in)
        assert layer.lora_A.shape == (3, d_in) and layer.lora_B.shape == (d_out, 3)
        assert layer.sparse_value.shape == (nnz,) and layer.sparse_index.shape == (nnz,)
        index = layer.sparse_index
        assert index.dtype == torch.long and bool((index[1:] > index[:-1]).all())  # sorted, no repeats
        assert 0 <= index.min() and index.max() < d_out * d_in
        assert layer.lora_A.dtype == layer.sparse_value.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.{n}" for t in ("q", "v") for n in ("lora_A", "lora_B", "sparse_value")}
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == SltrainAdapter().expected_trainable(base, params, ctx())
    assert count == 3 * (24 + 16) + int(0.1 * 384) + 3 * (24 + 40) + int(0.1 * 960)


def test_zero_delta_at_step_zero_and_the_authors_values_on_request():
    base, model, _ = wrapped()
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(layer.delta_weight()) == 0
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # A drawn, B and S zero
        assert layer.lora_A.abs().max() <= 1 / layer.in_features**0.5
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    _, drawn, _ = wrapped(sltrain_value_init="uniform")
    for layer in adapter_layers(drawn).values():
        values = layer.sparse_value
        assert torch.count_nonzero(values) == values.numel() and values.abs().max() <= 1 / layer.in_features**0.5
        torch.testing.assert_close(layer.delta_weight(), layer.sparse_weight(), rtol=0, atol=0)  # B = 0


def test_delta_weight_is_the_forward_contribution_and_merge_keeps_the_output():
    _, model, _ = wrapped(rank=4, alpha=6.0, sltrain_density=0.2)
    perturb(model)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    for layer in adapter_layers(model).values():
        contribution = layer(x) - layer.base(x)
        torch.testing.assert_close(contribution, x @ layer.delta_weight().T, rtol=1e-5, atol=1e-6)
        expected = 1.5 * layer.lora_B @ layer.lora_A
        expected.view(-1)[layer.sparse_index] += layer.sparse_value
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=0, atol=1e-7)
    before = model(x).detach()
    for layer in adapter_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_case_computed_by_hand():
    """W0 = 0 (2 x 3), r = 1, s = 2, B = [1, 2]^T, A = [1, 0, -1], support {1, 5} = (0, 1), (1, 2)
    with values 3, -4: Delta W = 2 [[1, 0, -1], [2, 0, -2]] + [[0, 3, 0], [0, 0, -4]]."""
    base = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(base.weight)
    layer = SparseLowRankLayer(
        base,
        torch.tensor([[1.0, 0.0, -1.0]]),
        torch.tensor([[1.0], [2.0]]),
        torch.tensor([1, 5]),
        torch.tensor([3.0, -4.0]),
        2.0,
    )
    expected = torch.tensor([[2.0, 3.0, -2.0], [4.0, 0.0, -8.0]])
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=0, atol=0)
    x = torch.tensor([[1.0, 1.0, 1.0]])
    out = layer(x)
    torch.testing.assert_close(out, torch.tensor([[3.0, -4.0]]), rtol=0, atol=0)
    (out * torch.tensor([[1.0, 10.0]])).sum().backward()
    # dL/dW = g x^T = [[1, 1, 1], [10, 10, 10]]; the values' gradient is it on the support
    torch.testing.assert_close(layer.sparse_value.grad, torch.tensor([1.0, 10.0]), rtol=0, atol=0)
    # dL/dB = s (dL/dW) A^T = 2 [[0], [0]]; dL/dA = s B^T dL/dW = 2 [21, 21, 21]
    torch.testing.assert_close(layer.lora_B.grad, torch.zeros(2, 1), rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_A.grad, torch.full((1, 3), 42.0), rtol=0, atol=0)


def test_values_gradient_is_the_dense_gradient_on_the_support():
    _, model, _ = wrapped(sltrain_density=0.25)
    perturb(model)
    layer = model.q
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    g = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    (layer(x) * g).sum().backward()
    dense = g.T @ x
    torch.testing.assert_close(layer.sparse_value.grad, dense.view(-1)[layer.sparse_index], rtol=1e-5, atol=1e-6)


def test_support_regenerates_from_the_seed_and_is_not_saved(tmp_path):
    _, one, _ = wrapped(seed=3)
    _, same, _ = wrapped(seed=3, rank=5)  # its own generator: the rank does not move it
    _, other, _ = wrapped(seed=4)
    for name in ("q", "v"):
        assert torch.equal(one.get_submodule(name).sparse_index, same.get_submodule(name).sparse_index)
        assert not torch.equal(one.get_submodule(name).sparse_index, other.get_submodule(name).sparse_index)
    assert not torch.equal(one.q.sparse_index, one.v.sparse_index[: one.q.sparse_index.numel()])
    assert not any("sparse_index" in k for k in trainable_state_dict(one))
    perturb(one)
    save_trainable(one, tmp_path / "a.safetensors")
    _, again, _ = wrapped(seed=3)
    load_trainable(again, tmp_path / "a.safetensors")
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(again(x), one(x), rtol=0, atol=0)


def test_support_size_and_draw():
    assert support_size(16, 24, 0.03) == 11 and support_size(4096, 4096, 0.03) == int(0.03 * 4096 * 4096)
    index = draw_support(30, 20, 0.5, torch.Generator().manual_seed(0))
    assert index.numel() == 300 and index.unique().numel() == 300


def test_bf16_autocast_keeps_the_update_apart_from_w0():
    """W0 large, update tiny: under bf16 autocast the contribution is still right to bf16 of its own size."""
    base = nn.Linear(24, 16).requires_grad_(False)
    with torch.no_grad():
        base.weight.mul_(100.0)
    layer = SltrainAdapter().make_layer("q", base, SltrainParams(sltrain_density=0.2), ctx())
    perturb(layer, size=1e-4)
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ layer.delta_weight().double().T
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp = layer.adapter_forward(x).double()
    assert (amp - exact).norm() <= (0.01 + 2**-8) * exact.norm()


@pytest.mark.parametrize(
    "bad",
    [{"sltrain_density": 0.0}, {"sltrain_density": 1.0}, {"rank": 0}, {"alpha": 0.0}, {"sltrain_value_init": "x"}],
)
def test_params_refuse_bad_values(bad):
    with pytest.raises(ConfigError):
        SltrainParams(**bad)
