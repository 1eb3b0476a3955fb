"""The WeLore parity case, shared by scripts/parity/welore.py (the authors' code) and
tests/test_compressed.py (ours): seeded matrices with decaying spectra of different tails, the
thresholds and the minimum ratio."""

from __future__ import annotations

import torch

SHAPES = [(32, 32), (48, 32), (32, 64), (40, 40)]
THRESHOLDS = [0.05, 0.15, 0.3]
MIN_RATIO = 0.4999  # the authors' fine-tuning default (lib/downstream_arguments.py)


def weights() -> list[torch.Tensor]:
    """Matrices U diag(s) V^T with s_i = decay^i, a different decay each: heavy and light tails."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for (m, n), decay in zip(SHAPES, (0.7, 0.85, 0.93, 0.98)):
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
        k = min(m, n)
        s = decay ** torch.arange(k, dtype=torch.float32)
        out.append(u[:, :k] @ torch.diag(s) @ v[:, :k].T)
    return out
