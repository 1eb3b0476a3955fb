"""Fixed problems for the Q-GaLore parity check (scripts/parity/q_galore.py and
tests/test_parity_q_galore.py), beside the shared one in tests/parity_case.py.

The shared parity model cannot run the authors' defaults: their INT4 quantizer needs the basis's
entry count to be a multiple of the group size (256), and r·d there is 40-96. ``q_galore_model`` has
weights whose bases have r·d = 8·32 = 256 on both sides: 33x32 (right side, d = 32), 32x33 (left),
32x32 (square, right), plus a 4x32 head that is not projected. Its low-rank gradients have 264, 264
and 256 entries, so with ``min_8bit_size`` 256 the moments are 8-bit in one full and one partial
block. ``structured_gradients`` gives each projected weight a fixed rank-1 part a·s_t·u vᵀ (u, v unit
vectors) plus N(0, 1) noise: a = 20 with s_t = +1 (a stable leading subspace: the lazy refresh grows
the gap), a = 20 with a random sign s_t (the signed cosine flips), a = 8 (below the noise's top
singular value: unstable). All draws come from one seeded CPU generator, in a fixed order.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from torch import nn

from tests.parity_case import checksum

WEIGHTS = ["0", "2", "4"]  # projected; "6" is the head
KINDS = {"stable": (20.0, False), "flip": (20.0, True), "weak": (8.0, False)}  # (a, random sign)
STRENGTH = {"0": KINDS["stable"], "2": KINDS["flip"], "4": KINDS["weak"]}  # projected weight -> its stream


def q_galore_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 33), nn.Tanh(), nn.Linear(33, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def projected_weights(model: nn.Sequential) -> list[nn.Parameter]:
    return [model[int(i)].weight for i in WEIGHTS]


def other_params(model: nn.Sequential) -> list[nn.Parameter]:
    proj = {id(p) for p in projected_weights(model)}
    return [p for p in model.parameters() if id(p) not in proj]


def unit(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=gen)
    return x / x.norm()


def rank_one_stream(shape, strength: float, random_sign: bool, steps: int, gen: torch.Generator):
    """``steps`` gradients a·s_t·u vᵀ + N(0, 1) of ``shape``."""
    u, v = unit(shape[0], gen), unit(shape[1], gen)
    out = []
    for _ in range(steps):
        sign = (1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0) if random_sign else 1.0
        out.append(strength * sign * torch.outer(u, v) + torch.randn(shape, generator=gen))
    return out


def structured_gradients(model: nn.Sequential, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients in ``model.parameters()`` order: the rank-1 streams above for the
    projected weights, N(0, 1) for the rest."""
    gen = torch.Generator().manual_seed(seed)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    columns = []
    for name, shape in zip(names, shapes):
        module = name.split(".")[0]
        if name.endswith("weight") and module in STRENGTH:
            columns.append(rank_one_stream(shape, *STRENGTH[module], steps, gen))
        else:
            columns.append([torch.randn(shape, generator=gen) for _ in range(steps)])
    return [list(row) for row in zip(*columns)]


def projector_streams(steps: int, seed: int = 2) -> dict[str, list[torch.Tensor]]:
    """Gradient streams for one projector: both sides, stable / sign-flipping / unstable."""
    gen = torch.Generator().manual_seed(seed)
    streams = {}
    for side, shape in (("right", (33, 32)), ("left", (32, 40))):
        for kind, (strength, random_sign) in KINDS.items():
            streams[f"{side}_{kind}"] = rank_one_stream(shape, strength, random_sign, steps, gen)
    return streams


def feed(model: nn.Module, optimizer, grads: list[list[torch.Tensor]]) -> list[dict]:
    """Set each step's gradients, step, zero the gradients; a checksum per step."""
    trajectory = []
    for row in grads:
        for p, g in zip(model.parameters(), row):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trajectory.append(checksum(model))
    return trajectory


def packed_snapshot(model: nn.Module) -> dict[str, str]:
    """Every parameter exactly, as base64 of its little-endian fp32 bytes (row-major): the full values
    in a quarter of the room JSON numbers take."""
    return {name: pack(p.detach()) for name, p in model.named_parameters()}


def pack(x: torch.Tensor) -> str:
    return base64.b64encode(x.float().contiguous().numpy().astype("<f4").tobytes()).decode()


def unpack(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").copy())


def max_packed_diff(model: nn.Module, expected: dict[str, str]) -> float:
    """Largest |ours - reference| over every parameter."""
    worst = 0.0
    for name, p in model.named_parameters():
        ref = unpack(expected[name]).double()
        worst = max(worst, (p.detach().double().reshape(-1) - ref).abs().max().item())
    return worst


def blockwise_data(kind: str) -> torch.Tensor:
    """600 entries (two full 256-blocks and a partial one) for the 8-bit state quantizer; the first
    block spans six decades of the dynamic map. ``kind`` signed: m-like, unsigned: v-like."""
    gen = torch.Generator().manual_seed(3 if kind == "signed" else 4)
    x = torch.randn(600, generator=gen) * 1e-2
    x = x if kind == "signed" else x**2
    x[:256] *= torch.logspace(-6, 0, 256)
    return x


def basis_data(layout: str) -> torch.Tensor:
    """A fixed 8 x 64 (right: B) or 64 x 8 (left: A) matrix of basis-like entries for the INT4 quantizer."""
    gen = torch.Generator().manual_seed(5 if layout == "right" else 6)
    x = torch.randn(8, 64, generator=gen) / 8.0
    return x if layout == "right" else x.T.contiguous()
