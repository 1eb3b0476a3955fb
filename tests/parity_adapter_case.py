"""The fixed problem the adapter-layer parity checks share (scripts/parity/nlora.py, scripts/parity/soma.py,
tests/test_parity_nlora.py, tests/test_parity_soma.py).

A few independent ``nn.Linear`` layers (d_out x d_in, with bias) whose weights and biases are seeded
Gaussians (std 1 / sqrt(d_in) for W0, 0.1 for the bias), each wrapped by the adapter layer under test
(the reference's class in a script, ours in a test). Every step draws, per layer and in a fixed order
from one CPU generator, an input batch x (4 x d_in, N(0, 1)) and a target (4 x d_out, N(0, 0.25));
the loss is the sum over layers of 0.5 * mean((layer(x) - target)^2), one ``torch.optim.AdamW`` steps
every trainable factor. Recorded: the factors at construction (and their checksum), the outputs and
the gradients of the first step, a checksum of every factor after each step and the factors after
the last one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

SHAPES = [(12, 10), (10, 12)]  # (d_out, d_in): d_out > d_in and d_out < d_in (rank 8 fits both)
BATCH = 4
DIGITS = 12  # significant digits kept in fixtures (the tolerances are >= 1e-7)


def base_linears(shapes=SHAPES, seed: int = 0) -> list[nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for d_out, d_in in shapes:
        linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in))
            linear.bias.copy_(0.1 * torch.randn(d_out, generator=gen))
        linear.requires_grad_(False)
        layers.append(linear)
    return layers


def batches(shapes, steps: int, seed: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(BATCH, d_in, generator=gen), 0.5 * torch.randn(BATCH, d_out, generator=gen))
            for d_out, d_in in shapes
        ]
        for _ in range(steps)
    ]


def rounded(t: torch.Tensor) -> list:
    """A tensor as nested lists of floats with ``DIGITS`` significant digits."""
    flat = [float(f"{v:.{DIGITS}g}") for v in t.detach().double().flatten().tolist()]
    if t.ndim == 0:
        return flat[0]
    out: list = flat
    for size in reversed(t.shape[1:]):
        out = [out[i : i + size] for i in range(0, len(out), size)]
    return out


def factor_checksum(factors: list[dict[str, torch.Tensor]]) -> list[dict[str, list[float]]]:
    return [
        {k: [v.detach().double().sum().item(), v.detach().double().abs().sum().item()] for k, v in f.items()}
        for f in factors
    ]


def train_layers(
    layers: list[nn.Module],
    factors_of: Callable[[nn.Module], dict[str, torch.Tensor]],
    trainable_of: Callable[[nn.Module], list[nn.Parameter]],
    settings: dict,
    shapes=SHAPES,
) -> dict:
    """Run ``settings["steps"]`` AdamW steps (lr, betas, eps, weight_decay from ``settings``) on the
    wrapped ``layers``; ``factors_of(layer)`` names its factors ("B", "M", "A"), ``trainable_of`` lists
    the parameters that train. Returns init, out0, grad0, trajectory and final (all in float64 lists)."""
    params = [p for layer in layers for p in trainable_of(layer)]
    opt = torch.optim.AdamW(
        params,
        lr=settings["lr"],
        betas=tuple(settings["betas"]),
        eps=settings["eps"],
        weight_decay=settings["weight_decay"],
    )
    init = [{k: rounded(v) for k, v in factors_of(layer).items()} for layer in layers]
    init_checksum = factor_checksum([factors_of(layer) for layer in layers])
    out0, grad0, trajectory = None, None, []
    for t, data in enumerate(batches(shapes, settings["steps"])):
        outs = [layer(x) for layer, (x, _) in zip(layers, data)]
        loss = sum(0.5 * ((y - target) ** 2).mean() for y, (_, target) in zip(outs, data))
        loss.backward()
        if t == 0:
            out0 = [rounded(y) for y in outs]
            grad0 = [
                {
                    k: rounded(v.grad)
                    for k, v in factors_of(layer).items()
                    if isinstance(v, nn.Parameter) and v.grad is not None
                }
                for layer in layers
            ]
        opt.step()
        opt.zero_grad(set_to_none=True)
        trajectory.append(factor_checksum([factors_of(layer) for layer in layers]))
    final = [{k: rounded(v) for k, v in factors_of(layer).items()} for layer in layers]
    return {
        "init": init,
        "init_checksum": init_checksum,
        "out0": out0,
        "grad0": grad0,
        "trajectory": trajectory,
        "final": final,
    }


def max_nested_diff(ours, ref) -> float:
    """Largest |a - b| over two equally nested lists of floats (or dicts of them)."""
    if isinstance(ref, dict):
        assert set(ours) == set(ref), (sorted(ours), sorted(ref))
        return max((max_nested_diff(ours[k], ref[k]) for k in ref), default=0.0)
    if isinstance(ref, list):
        assert len(ours) == len(ref), (len(ours), len(ref))
        return max((max_nested_diff(a, b) for a, b in zip(ours, ref)), default=0.0)
    return abs(float(ours) - float(ref))
