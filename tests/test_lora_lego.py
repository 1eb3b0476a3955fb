"""LoRA-LEGO (lorabench/protocols/compose/lego.py): the rule, checked on cases whose answer follows from the math.

ΔW_m = s · Σ_j b_j a_jᵀ, with (b_j, a_j) the k-means centroid of cluster j, each part rescaled to its
members' mean norm (parameter reweighting), and s = √(r̄ / k), r̄ = N / K (output reweighting).
"""

from __future__ import annotations

import math

import pytest
import torch

from lorabench.errors import ConfigError
from lorabench.protocols.compose.lego import cluster_units, lego_merge, output_scale, semantic_units

SQ2 = math.sqrt(2.0)


def _random_lora(gen: torch.Generator, d_out: int, r: int, d_in: int, dtype=torch.float64):
    return torch.randn(d_out, r, generator=gen, dtype=dtype), torch.randn(r, d_in, generator=gen, dtype=dtype)


def _delta(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b @ a


def _close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# The hand example: two rank-2 LoRAs of a 2 x 2 layer.
# LoRA 1: units u1 = (b=(3, 4), a=(1, 0)), u2 = (b=(-1, 0), a=(0, 2))
# LoRA 2: units u3 = (b=(4, 3), a=(1, 0)), u4 = (b=(-1, 0), a=(2, 0))
# Clusters at k=2: {u1, u3} (squared distance 2) and {u2, u4} (squared distance 8); any other split puts
# units ~33 apart together, so the partition is unambiguous.
HAND = [
    (torch.tensor([[3.0, -1.0], [4.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0], [0.0, 2.0]])),
    (torch.tensor([[4.0, -1.0], [3.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0], [2.0, 0.0]])),
]
HAND = [(b, a.to(torch.float64)) for b, a in HAND]


def test_semantic_units_are_b_columns_with_a_rows():
    units = semantic_units(HAND)
    expected = torch.tensor(
        [[3, 4, 1, 0], [-1, 0, 0, 2], [4, 3, 1, 0], [-1, 0, 2, 0]],
        dtype=torch.float64,
    )
    assert torch.equal(units, expected)


def test_hand_example_rank_two():
    # {u1, u3}: mean b = (3.5, 3.5), |mean b| = 3.5√2 < 5 = mean |b|, so b -> (5/√2, 5/√2); a = (1, 0) unchanged.
    # {u2, u4}: b = (-1, 0) unchanged; mean a = (1, 1), |mean a| = √2 < 2 = mean |a|, so a -> (√2, √2).
    # s = √((4 / 2) / 2) = 1.
    labels, _ = cluster_units(semantic_units(HAND), 2)
    # clusters are numbered by their first unit in lexicographic order: u2 = (-1, 0, 0, 2) comes first
    assert labels.tolist() == [1, 0, 1, 0]
    b_m, a_m = lego_merge(HAND, rank=2)
    assert b_m.shape == (2, 2) and a_m.shape == (2, 2)
    _close(b_m, torch.tensor([[-1.0, 5 / SQ2], [0.0, 5 / SQ2]], dtype=torch.float64))
    _close(a_m, torch.tensor([[SQ2, SQ2], [1.0, 0.0]], dtype=torch.float64))
    _close(_delta(b_m, a_m), torch.tensor([[1.5 * SQ2, -SQ2], [2.5 * SQ2, 0.0]], dtype=torch.float64))


def test_hand_example_rank_one():
    # One cluster of all four units.
    # mean b = (5/4, 7/4), |mean b| = √74 / 4, mean |b| = (5 + 1 + 5 + 1) / 4 = 3 -> b = 3 (5, 7) / √74
    # mean a = (1, 1/2),  |mean a| = √5 / 2,  mean |a| = (1 + 2 + 1 + 2) / 4 = 3/2 -> a = (3, 3/2) / √5
    # s = √((4 / 2) / 1) = √2
    b_expected = 3 * torch.tensor([[5.0], [7.0]], dtype=torch.float64) / math.sqrt(74)
    a_expected = torch.tensor([[3.0, 1.5]], dtype=torch.float64) / math.sqrt(5)
    b_m, a_m = lego_merge(HAND, rank=1)
    _close(b_m, SQ2 * b_expected)
    _close(a_m, a_expected)
    # plain centroids with both reweightings off; √2 times that with the output reweighting only
    plain = torch.tensor([[1.25], [1.75]], dtype=torch.float64) @ torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    _close(_delta(*lego_merge(HAND, 1, reweight_params=False, reweight_output=False)), plain)
    _close(_delta(*lego_merge(HAND, 1, reweight_params=False)), SQ2 * plain)


def test_identical_loras_merge_back_to_that_lora():
    # K copies of one rank-r LoRA, k = r: each cluster holds the K copies of one unit, so the centroid is that
    # unit, no norm decays (reweighting factor 1), and s = √(r / r) = 1: ΔW_m = ΔW, not K ΔW.
    gen = torch.Generator().manual_seed(1)
    b, a = _random_lora(gen, 7, 3, 5)
    for dtype in (torch.float64, torch.float32):
        factors = [(b.to(dtype), a.to(dtype))] * 4
        b_m, a_m = lego_merge(factors, rank=3)
        assert b_m.dtype == dtype and a_m.dtype == dtype
        assert b_m.shape == (7, 3) and a_m.shape == (3, 5)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        _close(_delta(b_m, a_m), _delta(b, a).to(dtype), tol)


def test_full_rank_is_identity_partition_and_scaled_concatenation():
    # k = N: every unit is its own cluster, nothing decays, and s = √((N / K) / N) = 1 / √K. Heterogeneous
    # ranks 2 and 3: N = 5, K = 2, so ΔW_m = (ΔW_1 + ΔW_2) / √2; without the output reweighting it is the
    # concatenation, i.e. exactly the sum (concatenation-summation equivalence).
    gen = torch.Generator().manual_seed(2)
    factors = [_random_lora(gen, 6, 2, 4), _random_lora(gen, 6, 3, 4)]
    total = sum(_delta(b, a) for b, a in factors)
    labels, centroids = cluster_units(semantic_units(factors), 5)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4]
    assert output_scale([2, 3], 5) == pytest.approx(1 / SQ2)
    _close(_delta(*lego_merge(factors, rank=5)), total / SQ2)
    _close(_delta(*lego_merge(factors, rank=5, reweight_output=False)), total)


def test_rank_permutation_and_lora_order_do_not_change_the_merge():
    gen = torch.Generator().manual_seed(3)
    factors = [_random_lora(gen, 8, 4, 6) for _ in range(3)]
    base = _delta(*lego_merge(factors, rank=5, seed=0))
    permuted = []
    for b, a in factors:
        perm = torch.randperm(b.shape[1], generator=gen)
        assert torch.allclose(b[:, perm] @ a[perm], b @ a)  # an MSU permutation leaves each LoRA's ΔW unchanged
        permuted.append((b[:, perm], a[perm]))
    _close(_delta(*lego_merge(permuted, rank=5, seed=0)), base)
    _close(_delta(*lego_merge(permuted[::-1], rank=5, seed=0)), base)


def test_same_seed_same_merge():
    gen = torch.Generator().manual_seed(4)
    factors = [_random_lora(gen, 8, 4, 6) for _ in range(3)]
    first, second = lego_merge(factors, rank=6, seed=7), lego_merge(factors, rank=6, seed=7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_parameter_reweighting_restores_each_parts_mean_norm():
    # With the output reweighting off, merged column j of B has the direction of its cluster's mean b and the
    # members' mean |b|; likewise for row j of A. A whole-unit norm match (|[b; a]|) would fail this.
    gen = torch.Generator().manual_seed(5)
    factors = [(0.01 * b, a) for b, a in (_random_lora(gen, 6, 4, 5) for _ in range(3))]  # B << A, as trained
    units = semantic_units(factors)
    labels, centroids = cluster_units(units, 5)
    b_m, a_m = lego_merge(factors, rank=5, reweight_output=False)
    for j in range(5):
        members = units[labels == j]
        b_norm = torch.linalg.vector_norm(members[:, :6], dim=1).mean()
        a_norm = torch.linalg.vector_norm(members[:, 6:], dim=1).mean()
        _close(torch.linalg.vector_norm(b_m[:, j]), b_norm)
        _close(torch.linalg.vector_norm(a_m[j]), a_norm)
        _close(b_m[:, j] / b_norm, centroids[j, :6] / torch.linalg.vector_norm(centroids[j, :6]))
        _close(a_m[j] / a_norm, centroids[j, 6:] / torch.linalg.vector_norm(centroids[j, 6:]))


@pytest.mark.parametrize("rank", [0, 5, -1, 2.0, True])
def test_rank_out_of_range(rank):
    with pytest.raises(ConfigError, match=r"rank .*\[1, 4\].*2 LoRA\(s\).*got"):
        lego_merge(HAND, rank=rank)


def test_rank_above_distinct_units():
    gen = torch.Generator().manual_seed(6)
    lora = _random_lora(gen, 4, 2, 3)
    with pytest.raises(ConfigError, match=r"rank=3 exceeds the number of distinct rank-1 units \(2 of 4\).*\[1, 2\]"):
        lego_merge([lora, lora], rank=3)


def test_shape_errors_name_the_shapes():
    b, a = torch.zeros(4, 2), torch.zeros(3, 5)
    with pytest.raises(ConfigError, match=r"#0.*B \(4, 2\) and A \(3, 5\)"):
        lego_merge([(b, a)], rank=1)
    good = (torch.zeros(4, 2), torch.zeros(2, 5))
    with pytest.raises(ConfigError, match=r"#1: B \(6, 2\) and A \(2, 5\).*d_out=4, d_in=5"):
        lego_merge([good, (torch.zeros(6, 2), torch.zeros(2, 5))], rank=1)
    with pytest.raises(ConfigError, match=r"#1: B \(4, 2\) and A \(2, 3\).*d_out=4, d_in=5"):
        lego_merge([good, (torch.zeros(4, 2), torch.zeros(2, 3))], rank=1)
    with pytest.raises(ConfigError, match=r"matrices, got B \(4, 2, 1\)"):
        lego_merge([(torch.zeros(4, 2, 1), torch.zeros(2, 5))], rank=1)
    with pytest.raises(ConfigError, match="at least one LoRA"):
        lego_merge([], rank=1)
