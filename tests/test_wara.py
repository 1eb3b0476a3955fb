"""WaRA's rule (lorabench/methods/adapters/wara.py): Delta W = s (S_L B A P_L + S_H B A P_H), one B A
shared by the low and high band of a one-level DWT along the features, with ptwt's transforms.
Each test fails on a wrong rule: band shapes and the parameter count, a zero update at init, Delta W
being what the forward adds, merging, a hand-computed Haar case (Delta W = (B A) kron I_2), the IDWT2 of
the LL/HH coefficient array, per-token (causal) updates, odd widths and the Params checks."""

from __future__ import annotations

import math

import ptwt
import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_wara import WaraParams
from lorabench.methods.adapters.layer import trainable_state_dict
from lorabench.methods.adapters.wara import WaraAdapter, WaraLayer, band_length
from lorabench.methods.base import MethodContext


def ctx(targets=("q", "v")) -> MethodContext:
    return MethodContext(list(targets), "causal_lm", 1e-3, 0.0, 1, 0)


def layer_of(d_in: int, d_out: int, dtype=torch.float64, randomize: bool = True, **params) -> WaraLayer:
    gen = torch.Generator().manual_seed(d_in * 31 + d_out)
    base = nn.Linear(d_in, d_out).to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=dtype) / math.sqrt(d_in))
    layer = WaraAdapter().make_layer("q", base, WaraParams(**params), ctx())
    if randomize:
        with torch.no_grad():
            layer.wara_B.copy_(torch.randn(layer.wara_B.shape, generator=gen, dtype=dtype))
    return layer


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(8, 6), nn.Linear(7, 5), nn.Linear(6, 6)


def test_band_shapes_and_parameter_count_match_expected_trainable():
    model, params = Tiny(), WaraParams(rank=3)
    adapter = WaraAdapter()
    expected = adapter.expected_trainable(model, params, ctx())
    adapter.apply(model, params, ctx(), {})
    assert (model.q.wara_A.shape, model.q.wara_B.shape) == ((3, 4), (3, 3))  # A r x d_in/2, B d_out/2 x r
    assert (model.v.wara_A.shape, model.v.wara_B.shape) == ((3, 4), (3, 3))  # odd widths: ceil(d / 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected == 3 * (4 + 3) * 2
    assert set(trainable_state_dict(model)) == {"q.wara_A", "q.wara_B", "v.wara_A", "v.wara_B"}
    assert isinstance(model.o, nn.Linear)  # untargeted layers stay as they are
    assert adapter.layer_trainable(4096, 4096, WaraParams()) == 8 * 4096  # half LoRA's 2 r d at rank 8
    assert adapter.size_limit([(6, 8), (5, 7)], params) == 3 and band_length(8, "db2", "zero") == 5


def test_zero_update_at_init_and_a_gradient_for_b():
    layer = layer_of(8, 6, randomize=False)
    bound = 1 / math.sqrt(layer.n_in)  # nn.Linear's Kaiming uniform on the band width
    assert torch.count_nonzero(layer.wara_B) == 0 and 0 < layer.wara_A.abs().max() <= bound
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(layer.delta_weight(), torch.zeros(6, 8, dtype=torch.float64))
    out = layer(x)
    torch.testing.assert_close(out, layer.base(x), rtol=0, atol=0)
    out.sum().backward()
    assert layer.wara_B.grad.abs().sum() > 0 and layer.wara_A.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "d_in,d_out,kw", [(8, 6, {}), (7, 5, {}), (9, 12, {"wara_wavelet": "db2"}), (7, 5, {"wara_mode": "symmetric"})]
)
def test_delta_weight_is_what_the_forward_adds_and_merges(d_in, d_out, kw):
    layer = layer_of(d_in, d_out, rank=2, alpha=3.0, **kw)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    with torch.no_grad():
        contribution = layer(x) - layer.base(x)
        delta = layer.delta_weight()
        assert delta.shape == (d_out, d_in)
        torch.testing.assert_close(contribution, x @ delta.T, rtol=0, atol=1e-12)
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
        layer.unmerge()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)


def test_hand_computed_haar_case_is_b_a_kron_identity():
    """Haar, d_in 4 -> d_out 2, r 1: P_L = [[1,1,0,0],[0,0,1,1]]/sqrt2, P_H = [[1,-1,0,0],[0,0,1,-1]]/sqrt2,
    S_L = [1,1]^T/sqrt2, S_H = [1,-1]^T/sqrt2, M = B A = [[b a1, b a2]]; S_L M P_L + S_H M P_H =
    b [[a1, 0, a2, 0], [0, a1, 0, a2]]: even outputs read even inputs, odd read odd, both through M."""
    layer = layer_of(4, 2, randomize=False, rank=1, alpha=0.5)
    with torch.no_grad():
        layer.wara_A.copy_(torch.tensor([[2.0, -3.0]]))
        layer.wara_B.copy_(torch.tensor([[5.0]]))
    s, a1, a2, b = 0.5, 2.0, -3.0, 5.0
    expected = s * b * torch.tensor([[a1, 0, a2, 0], [0, a1, 0, a2]], dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=0, atol=1e-12)
    big = layer_of(12, 10, rank=3)  # in general, Haar on even widths: Delta W = s (B A) kron I_2
    m = big.scale * big.wara_B @ big.wara_A
    torch.testing.assert_close(big.delta_weight(), torch.kron(m, torch.eye(2, dtype=m.dtype)), rtol=0, atol=1e-12)


def test_haar_delta_weight_is_the_idwt2_of_the_ll_hh_coefficient_array():
    """Delta W = s IDWT2(C) with C's LL and HH quadrants both B A (LH = HL = 0), by ptwt.waverec2."""
    layer = layer_of(10, 6, rank=2, alpha=2.0)
    with torch.no_grad():
        m = layer.wara_B @ layer.wara_A
        zero = torch.zeros_like(m)
        idwt2 = ptwt.waverec2((m[None], (zero[None], zero[None], m[None])), "haar")[0]
        torch.testing.assert_close(layer.delta_weight(), layer.scale * idwt2, rtol=0, atol=1e-12)
        only_ll = ptwt.waverec2((m[None], (zero[None], zero[None], zero[None])), "haar")[0]
        assert (layer.delta_weight() - layer.scale * only_ll).abs().max() > 1e-3


def test_each_token_is_updated_on_its_own():
    """The paper's token-axis transform cancels: changing one token's input leaves the others' outputs."""
    layer = layer_of(8, 6, rank=2)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    moved = x.clone()
    moved[0, 3] += torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        a, b = layer(x), layer(moved)
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(a[0, keep], b[0, keep], rtol=0, atol=0)
    assert (a[0, 3] - b[0, 3]).abs().max() > 0


def test_float32_layer_under_bf16_autocast_keeps_its_dtypes():
    layer = layer_of(8, 6, dtype=torch.bfloat16, rank=2)
    assert layer.wara_A.dtype == torch.float32  # half-precision base -> float32 adapter tensors
    x = torch.randn(4, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.delta_weight().dtype == torch.float32
    exact = x.double() @ layer.delta_weight().double().T
    assert (layer.adapter_forward(x).double() - exact).norm() <= 0.02 * exact.norm()


def test_params_are_checked():
    with pytest.raises(ConfigError, match="wara_wavelet"):
        WaraParams(wara_wavelet="morl")  # continuous, not a DWT wavelet
    with pytest.raises(ConfigError, match="wara_mode"):
        WaraParams(wara_mode="periodization")
    with pytest.raises(ConfigError, match="rank"):
        WaraParams(rank=0)
    assert WaraParams().wara_wavelet == "haar" and WaraParams().wara_mode == "zero"
