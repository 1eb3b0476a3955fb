"""Block-LoRA's rules (lorabench/methods/adapters/block_lora.py, no authors' code: fidelity ``rule``),
for both partitions: shapes, the count = expected_trainable, zero initial delta, forward = delta_weight,
merging, hand-computed cases of Delta W = s (sum_i B_i) A (rank) and Delta W x = s sum_i B_i A x_i
(input), and the rank partition's equal-arms property."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_block_lora import BlockLoraParams
from lorabench.methods.adapters.block_lora import BlockLoraAdapter, BlockLoraLayer
from lorabench.methods.adapters.layer import adapter_layers
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import fidelity_of
from lorabench.registry import ADAPTERS

PARTITIONS = ("rank", "input")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.up = nn.Linear(8, 8), nn.Linear(8, 12)

    def forward(self, x):
        return self.up(torch.tanh(self.q(x)))


def ctx(seed: int = 0) -> MethodContext:
    return MethodContext(["q", "up"], "causal_lm", 1e-3, 0.0, 1, seed)


def wrapped(partition: str, rank: int = 2, blocks: int = 4, seed: int = 0):
    torch.manual_seed(0)
    params = BlockLoraParams(rank=rank, alpha=4.0, block_lora_blocks=blocks, block_lora_partition=partition)
    return BlockLoraAdapter().apply(Toy().double(), params, ctx(seed), {}), params


def perturb(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_registered_with_a_rule_fidelity():
    assert ADAPTERS.get("block_lora") is BlockLoraAdapter
    assert fidelity_of(BlockLoraAdapter).status == "rule"
    assert BlockLoraParams().scale == pytest.approx(16.0 / 8)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_shapes_and_the_trainable_count(partition):
    torch.manual_seed(0)
    base = Toy().double()
    params = BlockLoraParams(rank=2, alpha=4.0, block_lora_blocks=4, block_lora_partition=partition)
    adapter = BlockLoraAdapter()
    expected = adapter.expected_trainable(base, params, ctx())
    model = adapter.apply(base, params, ctx(), {})
    layers = adapter_layers(model)
    width = 8 if partition == "rank" else 8 // 4
    assert all(m.scale == pytest.approx(4.0 / (4 * 2)) for m in layers.values())  # s = alpha / (n r)
    for name, d_out in (("q", 8), ("up", 12)):
        assert layers[name].lora_A.shape == (2, width) and layers[name].lora_B.shape == (4, d_out, 2)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # by hand: rank: r d_in + n r d_out = 16 + 64 and 16 + 96; input: r d_in / n + n r d_out = 4 + 64 and 4 + 96
    by_hand = {"rank": 80 + 112, "input": 68 + 100}[partition]
    assert count == expected == by_hand


@pytest.mark.parametrize("partition", PARTITIONS)
def test_zero_delta_at_init(partition):
    model, _ = wrapped(partition)
    torch.manual_seed(0)
    base = Toy().double()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(layer.delta_weight()) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_rank_partition_by_hand():
    """r = 1, n = 2, s = alpha / (n r) = 1.5: Delta W = s (B_1 + B_2) A."""
    layer = BlockLoraLayer(nn.Linear(3, 2).double(), 1, 2, "rank", 1.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
        layer.lora_B.copy_(torch.tensor([[[1.0], [2.0]], [[-3.0], [0.5]]]))
    # B_1 + B_2 = [-2, 2.5]^T; times A = [[-2, 4, -6], [2.5, -5, 7.5]]
    want = 1.5 * torch.tensor([[-2.0, 4.0, -6.0], [2.5, -5.0, 7.5]], dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), want, rtol=0, atol=1e-12)
    x = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(layer(x) - layer.base(x), x @ want.T, rtol=0, atol=1e-12)


def test_input_partition_by_hand():
    """d_in = 4 in n = 2 chunks of 2, r = 1, s = 1.5: Delta W = s [B_1 A | B_2 A], Delta W x = s sum_i B_i A x_i."""
    layer = BlockLoraLayer(nn.Linear(4, 2).double(), 1, 2, "input", 1.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[[2.0], [1.0]], [[0.0], [-3.0]]]))
    # B_1 A = [[2, -2], [1, -1]], B_2 A = [[0, 0], [-3, 3]]
    want = 1.5 * torch.tensor([[2.0, -2.0, 0.0, 0.0], [1.0, -1.0, -3.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), want, rtol=0, atol=1e-12)
    x = torch.tensor([[1.0, 3.0, -2.0, 0.5]], dtype=torch.float64)
    # A x_1 = -2, A x_2 = -2.5: s (B_1 (-2) + B_2 (-2.5)) = 1.5 [-4, -2 + 7.5] = [-6, 8.25]
    torch.testing.assert_close(layer(x) - layer.base(x), torch.tensor([[-6.0, 8.25]], dtype=torch.float64))
    torch.testing.assert_close(x @ want.T, torch.tensor([[-6.0, 8.25]], dtype=torch.float64))


@pytest.mark.parametrize("partition", PARTITIONS)
def test_forward_contribution_is_delta_weight_and_merging_keeps_the_output(partition):
    model, _ = wrapped(partition)
    perturb(model)
    for layer in adapter_layers(model).values():
        h = torch.randn(2, 5, layer.in_features, dtype=torch.float64)  # a batch of sequences
        torch.testing.assert_close(layer(h) - layer.base(h), h @ layer.delta_weight().T, rtol=1e-12, atol=1e-12)
        n, d_out, _ = layer.lora_B.shape
        if partition == "rank":
            want = layer.scale * sum(layer.lora_B[i] for i in range(n)) @ layer.lora_A
        else:
            want = layer.scale * torch.cat([layer.lora_B[i] @ layer.lora_A for i in range(n)], dim=1)
        torch.testing.assert_close(layer.delta_weight(), want, rtol=0, atol=1e-12)
    x = torch.randn(4, 8, dtype=torch.float64)
    out = model(x).detach()
    layers = list(adapter_layers(model).values())
    weights = [layer.base.weight.detach().clone() for layer in layers]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
    for layer, weight in zip(layers, weights):
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-12)


def test_input_partition_needs_blocks_dividing_every_input_width():
    params = BlockLoraParams(rank=1, block_lora_blocks=3, block_lora_partition="input")
    with pytest.raises(ConfigError, match="must divide the input width 8"):
        BlockLoraAdapter().apply(Toy(), params, ctx(), {})
    BlockLoraAdapter().apply(Toy(), BlockLoraParams(rank=1, block_lora_blocks=3), ctx(), {})  # rank: any n


def test_rank_partition_arms_get_equal_gradients_and_stay_equal():
    """As read, sum_i B_i A is a rank-r LoRA: every arm's gradient is s G (A x)^T, so arms starting equal
    (B_i = 0) stay equal under AdamW; the input partition's arms see different chunks and part."""
    for partition, equal in (("rank", True), ("input", False)):
        model, _ = wrapped(partition)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            model(torch.randn(6, 8, generator=gen, dtype=torch.float64)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        for layer in adapter_layers(model).values():
            arms = layer.lora_B.detach()
            assert arms.abs().max() > 0
            assert torch.allclose(arms, arms[:1].expand_as(arms), rtol=0, atol=1e-12) is equal


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="block_lora_partition"):
        BlockLoraParams(block_lora_partition="rows")
    with pytest.raises(ConfigError, match="block_lora_blocks"):
        BlockLoraParams(block_lora_blocks=0)
