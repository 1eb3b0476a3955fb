"""The fixed LoRA problem the adapter-side optimizer parity checks share (scripts/parity/lora_pro.py and
tests/test_parity_lora_optimizers.py).

Five LoRA pairs, rank 8, on the weight shapes of tests/parity_case.py's MLP (d_out x d_in: 24x16,
24x24 square, 16x24, 10x16) and 8x8 (square A and B): A (r x d_in) seeded Gaussian / sqrt(d_in)
(for the square one a seeded U diag(1.2 .. 0.6) Vᵀ, well conditioned), B (d_out x r) zero (LoRA's
init) or seeded Gaussian with std 0.1. Each step draws a seeded full-weight gradient G (d_out x
d_in, CPU generator, fixed order) per layer and gives every pair the gradients autograd would give
for a loss whose gradient in the effective weight W0 + s B A is G: g_A = s Bᵀ G, g_B = s G Aᵀ,
computed from the current A and B. Consistent gradients matter: LoRA-Pro divides by BᵀB, so an
arbitrary g_A at B = 0 would be blown up by 1/ridge. The same code drives the reference and ours.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (d_out, d_in): the four weights of tests/parity_case.py (the second square) and an 8 x 8 one, where at
# rank 8 A and B are square too, so that a transposed product still has the right shape
SHAPES = [(24, 16), (24, 24), (16, 24), (10, 16), (8, 8)]
RANK = 8


def lora_pairs(dtype=torch.float64, b_init: str = "zero", seed: int = 0) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(A, B) per layer; ``b_init`` "zero" (LoRA) or "random" (std 0.1, as after some training)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for d_out, d_in in SHAPES:
        a = torch.randn(RANK, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        if d_in == RANK:  # a square Gaussian is ill-conditioned: U diag(1.2 .. 0.6) Vᵀ instead (AAᵀ ≠ AᵀA)
            u, v = (torch.linalg.qr(torch.randn(RANK, RANK, generator=gen, dtype=torch.float64))[0] for _ in "uv")
            a = u @ torch.diag(torch.linspace(1.2, 0.6, RANK, dtype=torch.float64)) @ v.T
        b = 0.1 * torch.randn(d_out, RANK, generator=gen, dtype=torch.float64)
        if b_init == "zero":
            b = torch.zeros_like(b)
        pairs.append((nn.Parameter(a.to(dtype)), nn.Parameter(b.to(dtype))))
    return pairs


def full_gradients(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of one seeded G (float64) per layer."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for d_out, d_in in SHAPES] for _ in range(steps)
    ]


def set_lora_gradients(pairs, grads: list[torch.Tensor], scale: float) -> None:
    """g_A = s Bᵀ G and g_B = s G Aᵀ (float64, cast to the parameters' dtype)."""
    for (a, b), g in zip(pairs, grads):
        a64, b64 = a.detach().double(), b.detach().double()
        a.grad = (scale * b64.T @ g).to(a.dtype)
        b.grad = (scale * g @ a64.T).to(b.dtype)


def pair_checksum(pairs) -> dict[str, list[float]]:
    """Sum and absolute sum (float64) of every A and B, keyed "<layer>.A" / "<layer>.B"."""
    out = {}
    for i, (a, b) in enumerate(pairs):
        for name, t in (("A", a), ("B", b)):
            x = t.detach().double()
            out[f"{i}.{name}"] = [x.sum().item(), x.abs().sum().item()]
    return out


def pair_snapshot(pairs) -> dict[str, list]:
    named = [(f"{i}.{name}", t) for i, (a, b) in enumerate(pairs) for name, t in (("A", a), ("B", b))]
    return {name: t.detach().double().tolist() for name, t in named}


def pair_max_abs_diff(pairs, expected: dict[str, list]) -> float:
    worst = 0.0
    for i, (a, b) in enumerate(pairs):
        for name, t in (("A", a), ("B", b)):
            ref = torch.tensor(expected[f"{i}.{name}"], dtype=torch.float64)
            worst = max(worst, (t.detach().double() - ref).abs().max().item())
    return worst


def run_pairs(pairs, scale: float, step, steps: int, seed: int = 1) -> list[dict]:
    """Set the consistent gradients, call ``step()`` (which must update the pairs and clear nothing it
    needs), ``steps`` times; returns a checksum per step."""
    trajectory = []
    for grads in full_gradients(steps, seed):
        set_lora_gradients(pairs, grads, scale)
        step()
        for a, b in pairs:
            a.grad = b.grad = None
        trajectory.append(pair_checksum(pairs))
    return trajectory
