"""The LQ-LoRA parity case, shared by scripts/parity/lq_lora.py (the authors' code) and
tests/test_compressed.py (ours): seeded matrices, a deterministic stand-in quantizer, the ranks and
iteration caps of the decomposition cases, and seeded ILP costs, storage and budgets.

The quantizer is a fixed rounding (each row to 7 levels of its own step) for both sides: the
comparison is of the alternation (order, stop rule, factor split), not of a quantizer; the
reference's NormalFloat kernels need CUDA and bitsandbytes.
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = [(24, 20), (20, 24), (16, 16)]
DECOMPOSITIONS = {"rank2_cap100": (2, 100), "rank4_cap100": (4, 100), "rank4_cap2": (4, 2)}


def weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def round_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row to the 7 levels {-3..3} x (its max |w| / 3)."""
    step = w.abs().amax(dim=1, keepdim=True) / 3
    return torch.round(w / step).clamp(-3, 3) * step


def ilp_case() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Costs falling and storage rising with the bits of 4 candidates, for 6 matrices; three budgets."""
    rng = np.random.default_rng(0)
    bits = np.array([2.0, 3.0, 4.0, 8.0])
    sizes = rng.integers(200, 1000, size=6).astype(float)
    costs = sizes[:, None] * (2.0 ** (-2 * bits))[None, :] * rng.uniform(0.5, 1.5, size=(6, 4))
    storage = sizes[:, None] * (bits[None, :] + 0.5) / 8
    total = sizes.sum()
    return costs, storage, [total * b / 8 for b in (2.6, 3.4, 5.0)]
