"""The fixed problem the optimizer parity checks share (scripts/parity/*.py and tests/test_parity.py).

A small MLP whose weights cover both projection sides and a square matrix (most of MiniLM's
projected weights are square): 16->24 (24x16, wide side right), 24->24 (square), 24->16 (16x24,
left) and 16->10 (10x16). Gradients are seeded Gaussians drawn in a fixed order with a CPU
generator, identical for the reference and for ours, so no loss or data is involved. A script runs
the authors' optimizer on ``parity_model()`` with ``feed_gradients`` and writes ``snapshot()``
values into a fixture with ``write_fixture``; the test does the same with ours and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
WEIGHTS = ["0", "2", "4", "6"]  # module names of the four linear layers (targets)


def parity_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 10)
    )


def projected_weights(model: nn.Sequential) -> list[nn.Parameter]:
    return [model[int(i)].weight for i in WEIGHTS]


def other_params(model: nn.Sequential) -> list[nn.Parameter]:
    proj = {id(p) for p in projected_weights(model)}
    return [p for p in model.parameters() if id(p) not in proj]


def gradients(model: nn.Module, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of seeded Gaussian gradients, one per parameter in ``model.parameters()`` order."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in model.parameters()]
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def feed_gradients(model: nn.Module, optimizer, steps: int, seed: int = 1, after_step=None) -> list[dict]:
    """Set the seeded gradients and call ``optimizer.step()`` ``steps`` times; returns a checksum per step."""
    trajectory = []
    for t, grads in enumerate(gradients(model, steps, seed)):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(t)
        trajectory.append(checksum(model))
    return trajectory


def checksum(model: nn.Module) -> dict[str, float]:
    """Sum and absolute sum of every parameter (float64), keyed by name."""
    out = {}
    for name, p in model.named_parameters():
        x = p.detach().double()
        out[name] = [x.sum().item(), x.abs().sum().item()]
    return out


def snapshot(model: nn.Module) -> dict[str, list]:
    """Every parameter in full (the parity model is small enough)."""
    return {name: p.detach().double().tolist() for name, p in model.named_parameters()}


def write_fixture(name: str, payload: dict) -> Path:
    """Write ``tests/fixtures/parity/<name>.json``: ``payload`` holds reference, version and cases."""
    for key in ("reference", "version", "produced_by", "cases"):
        if key not in payload:
            raise ValueError(f"parity fixture {name!r} lacks {key!r}")
    payload = {**payload, "torch": torch.__version__.split("+")[0]}
    path = FIXTURES / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def max_abs_diff(model: nn.Module, expected: dict[str, list]) -> float:
    """Largest |ours - reference| over every parameter."""
    worst = 0.0
    for name, p in model.named_parameters():
        ref = torch.tensor(expected[name], dtype=torch.float64)
        worst = max(worst, (p.detach().double() - ref).abs().max().item())
    return worst


def max_trajectory_diff(ours: list[dict], ref: list[dict]) -> float:
    """Largest checksum difference over every step and parameter."""
    assert len(ours) == len(ref), f"{len(ours)} steps vs the reference's {len(ref)}"
    return max(abs(a - b) for o, r in zip(ours, ref) for k in r for a, b in zip(o[k], r[k]))
