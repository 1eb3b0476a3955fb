"""TLoRA's rule (lorabench/methods/adapters/tlora.py): W = W0 T + (alpha / sqrt(r)) Delta, T a tensor-ring
matrix on the input side (identity at init), Delta a tensor ring (or B A) that is zero at init.

The split of widths into modes, T - I and Delta against index-by-index loops of the paper's formulas (and
the loops with the order of modes or the side of the transform changed, which the implementation must not
match), a case computed by hand with T's gradient, the trainable count against ``expected_trainable`` and
against the paper's parameter counts on SD 1.5, the model exactly W0 at init, ``delta_weight()`` equal to
the forward's contribution, merge equal to the forward, save/load, bf16 safety, and the Params checks.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_tlora import TloraParams
from lorabench.methods.adapters import tlora
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable
from lorabench.methods.adapters.tlora import (
    TloraAdapter,
    TransformedLowRankLayer,
    ring_residual,
    tensor_modes,
    transform_correction,
)
from lorabench.methods.base import MethodContext
from tests.method_harness import TwoLinears

GEN = torch.Generator


def ctx(seed: int = 0) -> MethodContext:
    return MethodContext(["q", "v"], "causal_lm", 1e-3, 0.0, 1, seed)


def wrapped(seed: int = 0, **overrides) -> tuple[nn.Module, nn.Module, TloraParams]:
    params = TloraParams(**overrides)
    return TwoLinears(), TloraAdapter().apply(TwoLinears(), params, ctx(seed), {}), params


def perturb(model: nn.Module, seed: int = 1, size: float = 0.1) -> None:
    gen = GEN().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=gen))


def multi_index(flat: int, modes, little_endian: bool = False) -> tuple[int, ...]:
    """Row-major digits of ``flat`` (the first mode most significant), or little-endian ones."""
    order = list(modes) if little_endian else list(modes)[::-1]
    digits = []
    for n in order:
        digits.append(flat % n)
        flat //= n
    return tuple(digits) if little_endian else tuple(digits[::-1])


def naive_trm(cores, little_endian=False, reverse=False) -> torch.Tensor:
    """T[(i), (j)] = tr(A_1[i_1, j_1] ... A_D[i_D, j_D]), entry by entry (or with a deliberate mistake)."""
    modes = [c.shape[0] for c in cores]
    size = math.prod(modes)
    t = torch.zeros(size, size, dtype=torch.float64)
    for row, col in itertools.product(range(size), range(size)):
        i, j = multi_index(row, modes, little_endian), multi_index(col, modes, little_endian)
        mats = [c[i[d], j[d]].double() for d, c in enumerate(cores)]
        t[row, col] = (
            torch.linalg.multi_dot(mats[::-1] if reverse else mats).trace() if len(mats) > 1 else mats[0].trace()
        )
    return t


def naive_tr(out_cores, in_cores) -> torch.Tensor:
    """Delta[(o), (i)] = tr(B_1[o_1] ... B_D[o_D] C_1[i_1] ... C_D[i_D]), entry by entry."""
    om, im = [c.shape[0] for c in out_cores], [c.shape[0] for c in in_cores]
    delta = torch.zeros(math.prod(om), math.prod(im), dtype=torch.float64)
    for row, col in itertools.product(range(delta.shape[0]), range(delta.shape[1])):
        o, i = multi_index(row, om), multi_index(col, im)
        mats = [c[o[d]] for d, c in enumerate(out_cores)] + [c[i[d]] for d, c in enumerate(in_cores)]
        delta[row, col] = torch.linalg.multi_dot([m.double() for m in mats]).trace()
    return delta


def test_tensor_modes_split_widths_like_the_authors_table():
    authors = {640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16)}  # their TENSOR_SHAPE_DICT
    assert {n: tensor_modes(n, 3) for n in authors} == authors
    assert tensor_modes(320, 3) == (5, 8, 8)  # theirs: (4, 8, 10), a larger transform (180 vs 153 per R_T^2)
    assert tensor_modes(24, 3) == (2, 3, 4) and tensor_modes(40, 3) == (2, 4, 5) and tensor_modes(4096, 3) == (16,) * 3
    assert tensor_modes(37, 3) == (1, 1, 37) and tensor_modes(24, 1) == (24,) and tensor_modes(24, 2) == (4, 6)
    for n, d in [(384, 3), (1536, 4), (11008, 3)]:
        assert math.prod(tensor_modes(n, d)) == n and len(tensor_modes(n, d)) == d


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_transform_correction_is_the_trm_minus_identity(rank):
    gen = GEN().manual_seed(rank)
    c = tlora.identity_share(rank)
    cores = [c * torch.eye(n)[:, :, None, None] + 0.3 * torch.randn(n, n, rank, rank, generator=gen) for n in (3, 2, 2)]
    expected = naive_trm(cores) - torch.eye(12, dtype=torch.float64)
    e = transform_correction(cores).double()
    torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-5)
    # the multi-index read little-endian is another matrix; so is the product of the ring in reverse order
    assert (naive_trm(cores, little_endian=True) - torch.eye(12) - e).abs().max() > 0.1
    if rank > 1:
        assert (naive_trm(cores, reverse=True) - torch.eye(12) - e).abs().max() > 0.1
    one = [c * torch.eye(5)[:, :, None, None] + 0.3 * torch.randn(5, 5, rank, rank, generator=gen)]
    torch.testing.assert_close(transform_correction(one).double(), naive_trm(one) - torch.eye(5), rtol=1e-5, atol=1e-6)


def test_kronecker_transform_is_the_kronecker_product():
    gen = GEN().manual_seed(0)
    mats = [torch.eye(n) + 0.2 * torch.randn(n, n, generator=gen) for n in (2, 3, 4)]
    expected = torch.kron(torch.kron(mats[0], mats[1]), mats[2]) - torch.eye(24)
    torch.testing.assert_close(transform_correction([m[:, :, None, None] for m in mats]), expected)


def test_ring_residual_is_the_tensor_ring():
    gen = GEN().manual_seed(0)
    out = [torch.randn(n, 3, 3, generator=gen) for n in (2, 1, 3)]
    inp = [torch.randn(n, 3, 3, generator=gen) for n in (2, 3, 2)]
    torch.testing.assert_close(ring_residual(out, inp).double(), naive_tr(out, inp), rtol=1e-5, atol=1e-4)


def test_a_case_computed_by_hand():
    """D = 2, Kronecker (R_T = 1), LoRA rank 1, alpha 1 (s = 1): A_1 = [[1, 2], [0, 1]], A_2 = [[1, 0], [3, 1]],
    T = A_1 (x) A_2; W0 = [[1, 0, 0, 0], [0, 0, 0, 1]] (2 x 4), B = [1, 2]^T, A = [1, 0, 0, -1]."""
    base = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]]))
    a1, a2 = torch.tensor([[1.0, 2], [0, 1]]), torch.tensor([[1.0, 0], [3, 1]])
    residual = {"lora_A": [torch.tensor([[1.0, 0, 0, -1]])], "lora_B": [torch.tensor([[1.0], [2.0]])]}
    layer = TransformedLowRankLayer(base, [a1[:, :, None, None], a2[:, :, None, None]], residual, 1.0)
    t = torch.tensor([[1.0, 0, 2, 0], [3, 1, 6, 2], [0, 0, 1, 0], [0, 0, 3, 1]])
    torch.testing.assert_close(layer.transform_delta() + torch.eye(4), t, rtol=0, atol=0)
    # W0 T - W0 = [[0, 0, 2, 0], [0, 0, 3, 0]], Delta = [[1, 0, 0, -1], [2, 0, 0, -2]]
    torch.testing.assert_close(layer.delta_weight(), torch.tensor([[1.0, 0, 2, -1], [2, 0, 3, -2]]), rtol=0, atol=0)
    x = torch.tensor([[1.0, 2, 3, 4]])
    out = layer(x)  # W0 T x = [7, 13], Delta x = [-3, -6]
    torch.testing.assert_close(out, torch.tensor([[4.0, 7.0]]), rtol=0, atol=0)
    (out * torch.tensor([[1.0, 10.0]])).sum().backward()
    # dL/dW = g^T x = [[1, 2, 3, 4], [10, 20, 30, 40]]; dL/dT = W0^T dL/dW; dL/dA_1[k, l] = sum over the
    # 2 x 2 block (k, l) of dL/dT times A_2, entrywise
    dt = base.weight.T @ torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40]])
    blocks = dt.reshape(2, 2, 2, 2).permute(0, 2, 1, 3)  # [k, l, i, j] = dT[2k + i, 2l + j]
    torch.testing.assert_close(layer.transform_cores[0].grad[:, :, 0, 0], (blocks * a2).sum((2, 3)))
    torch.testing.assert_close(
        layer.transform_cores[1].grad[:, :, 0, 0], torch.einsum("klij,kl->ij", blocks, a1), rtol=0, atol=0
    )
    torch.testing.assert_close(layer.lora_B.grad, torch.tensor([[-3.0], [-30.0]]), rtol=0, atol=0)


def test_the_transform_is_on_the_input_side():
    """A square layer: Delta W = W0 T - W0 (+ s Delta), not T W0 - W0."""
    base = nn.Linear(24, 24, bias=False)
    layer = TloraAdapter().make_layer("q", base, TloraParams(), ctx())
    perturb(layer, size=0.2)
    with torch.no_grad():
        t = layer.transform_delta() + torch.eye(24)
        residual = layer.scale * layer.residual()
        w0 = base.weight
        torch.testing.assert_close(layer.delta_weight(), w0 @ t - w0 + residual, rtol=1e-5, atol=1e-5)
        assert (layer.delta_weight() - (t @ w0 - w0 + residual)).abs().max() > 0.1


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tlora_residual": "lora", "rank": 3},
        {"tlora_transform_rank": 0},
        {"tlora_transform_rank": 1},
        {"tlora_modes": 2},
    ],
)
def test_trainable_count(overrides):
    base, model, params = wrapped(**overrides)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == TloraAdapter().expected_trainable(base, params, ctx())
    rt, r = params.tlora_transform_rank, params.rank
    modes = {n: tensor_modes(n, params.tlora_modes) for n in (16, 24, 40)}
    transform = 2 * rt * rt * sum(n * n for n in modes[24])
    if params.tlora_residual == "lora":
        assert count == transform + r * (24 + 16) + r * (24 + 40)
    else:
        assert count == transform + r * r * (sum(modes[16]) + sum(modes[40]) + 2 * sum(modes[24]))
    trainable = {n.split(".", 1)[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    expected = {"lora_A", "lora_B"} if params.tlora_residual == "lora" else {"residual_out", "residual_in"}
    assert trainable == expected | ({"transform_cores"} if rt else set())


def test_counts_match_the_papers_sd15_table(monkeypatch):
    """SD 1.5's UNet attention (16 blocks: 5 of width 320, 5 of 640, 6 of 1280; per block 6 square projections
    and the cross-attention to_k, to_v from 768), split by the authors' table: LoRA r = 4 is 0.80M, TLoRA(2,6)
    0.40M and TLoRA*(2,4) (LoRA residual) 0.94M, as the paper reports."""
    table = {320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16)}
    monkeypatch.setattr(tlora, "tensor_modes", lambda n, d: table[n])
    shapes = []
    for width, blocks in ((320, 5), (640, 5), (1280, 6)):
        shapes += [(width, width)] * (6 * blocks) + [(width, 768)] * (2 * blocks)

    def total(**kw):
        return sum(TloraAdapter().layer_trainable(o, i, TloraParams(**kw)) for o, i in shapes)

    assert sum(4 * (o + i) for o, i in shapes) == 797_184  # LoRA r = 4: 0.80M
    assert total(rank=6, tlora_transform_rank=2) == 400_288  # TLoRA(2,6): 0.40M
    assert round(total(rank=4, tlora_transform_rank=2, tlora_residual="lora") / 1e6, 2) == 0.94


@pytest.mark.parametrize("transform_rank", [1, 2, 3, 5])
@pytest.mark.parametrize("residual", ["tr", "lora"])
def test_the_model_is_w0_at_init_exactly(transform_rank, residual):
    base, model, _ = wrapped(tlora_transform_rank=transform_rank, tlora_residual=residual)
    x = torch.randn(5, 24, generator=GEN().manual_seed(2))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(layer.delta_weight()) == 0
        assert torch.count_nonzero(layer.transform_delta()) == 0
        assert torch.count_nonzero(layer.double().transform_delta()) == 0  # in float64 too (the bf16 test's copy)
        core = layer.transform_cores[0]  # Proposition 1: every ring slice is I / R_T
        torch.testing.assert_close(core, (torch.eye(2) / transform_rank)[:, :, None, None].expand_as(core).double())
        if residual == "tr":
            assert torch.count_nonzero(layer.residual_out[0]) == 0
            assert all(torch.count_nonzero(c) == c.numel() for c in [*layer.residual_out[1:], *layer.residual_in])
        else:
            assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()


def test_residual_init_scales():
    """The authors' draws: C_d ~ N(0, 1/sqrt(I_d)), B_d ~ N(0, sqrt(O_d)/r^2) (d > 1), LoRA A ~ N(0, 1/sqrt(3 d_in))."""
    layer = TloraAdapter().make_layer("q", nn.Linear(512, 512), TloraParams(rank=8), ctx())  # 512 = 8 x 8 x 8
    assert abs(layer.residual_in[0].std().item() * 8**0.5 - 1) < 0.1
    assert abs(layer.residual_out[1].std().item() / (8**0.5 / 64) - 1) < 0.1
    lora = TloraAdapter().make_layer("q", nn.Linear(4096, 64), TloraParams(rank=8, tlora_residual="lora"), ctx())
    assert abs(lora.lora_A.std().item() * (3 * 4096) ** 0.5 - 1) < 0.05
    assert lora.scale == 1.0 / 8**0.5


@pytest.mark.parametrize("overrides", [{}, {"tlora_residual": "lora", "tlora_transform_rank": 1, "alpha": 3.0}])
def test_delta_weight_is_the_forward_contribution_and_merge_keeps_the_output(overrides):
    _, model, _ = wrapped(**overrides)
    perturb(model)
    x = torch.randn(7, 24, generator=GEN().manual_seed(3))
    for layer in adapter_layers(model).values():
        contribution = layer(x) - layer.base(x)
        torch.testing.assert_close(contribution, x @ layer.delta_weight().T, rtol=1e-5, atol=1e-5)
    before = model(x).detach()
    weights = {n: layer.base.weight.detach().clone() for n, layer in adapter_layers(model).items()}
    deltas = {n: layer.delta_weight().detach() for n, layer in adapter_layers(model).items()}
    for layer in adapter_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.delta_weight(), deltas[name], rtol=0, atol=0)  # W0 is not re-read
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    _, one, _ = wrapped(seed=3)
    perturb(one)
    save_trainable(one, tmp_path / "a.safetensors")
    _, again, _ = wrapped(seed=4)
    load_trainable(again, tmp_path / "a.safetensors")
    x = torch.randn(4, 24, generator=GEN().manual_seed(6))
    torch.testing.assert_close(again(x), one(x), rtol=0, atol=0)


def test_bf16_autocast_keeps_the_transform_apart_from_w0():
    """W0 large, corrections tiny: under bf16 autocast the contribution is right to bf16 of its own size,
    while W0 T x - W0 x formed in bf16 (what the brief forbids) would lose it."""
    base = nn.Linear(24, 16).requires_grad_(False)
    with torch.no_grad():
        base.weight.mul_(100.0)
    layer = TloraAdapter().make_layer("q", base, TloraParams(), ctx())
    perturb(layer, size=1e-4)
    x = torch.randn(8, 24, generator=GEN().manual_seed(7))
    exact = x.double() @ layer.double().delta_weight().T
    layer.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp = layer.adapter_forward(x).double()
        t = layer.transform_delta() + torch.eye(24)
        naive = (nn.functional.linear(x, base.weight @ t) - base(x)).double()  # one bf16 W0 T x, minus W0 x
    assert (amp - exact).norm() <= (0.01 + 2**-8) * exact.norm()
    assert (naive - exact).norm() > 0.1 * exact.norm()


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 0},
        {"rank": 2.5},
        {"alpha": 0.0},
        {"tlora_transform_rank": -1},
        {"tlora_residual": "ttm"},
        {"tlora_modes": 0},
        {"tlora_modes": 9},
    ],
)
def test_params_refuse_bad_values(bad):
    with pytest.raises(ConfigError, match="method."):
        TloraParams(**bad)
