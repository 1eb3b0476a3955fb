"""Gradient projectors shared by the GaLore family (galore_family.py).

Papers: GaLore (Zhao et al., 2024, arXiv:2403.03507) SVD projection; FRUGAL (Zmushko et al.,
2025, arXiv:2411.07837) coordinate subsets (RandK, blocks).

A projector of a weight gradient G (m x n) works on one side, by galore-torch's ``proj_type`` rule
(``std``: the smaller dimension, left if m < n else right). Its basis B (r x d, orthonormal rows,
d = the projected dimension) gives

    left:  R = B G (r x n),  project_back(R) = Bᵀ R        right: R = G Bᵀ (m x r),  back = R B

so that back(project(G)) = Bᵀ B G (or G Bᵀ B) and the residual G - back(project(G)) is what
Fira and FRUGAL update without state. ``refresh(G, step)`` recomputes B; the optimizer calls it
when ``due(step)`` (``step % gap == 0``, galore-torch's rule). ``state_tensors()`` lists what the
projector keeps, for memory accounting: dense bases in fp32, index projectors only their r int64
indices. DCT-AdamW's projector (dct_adamw.py) registers itself here as ``dct``, Q-GaLore's INT4
projector with its lazy refresh (q_galore.py) as ``q_galore``.

Hyper-parameters: rank r (GaLore GLUE: 4-8; pre-training 128-1024), gap T (200; GLUE 500),
``oversample`` 8 for randomized SVD.
"""

from __future__ import annotations

import torch

from lorabench.method_params.optimizers import SIDE_RULES  # torch-free: GaLore's Params check proj_type


class Projector:
    """Base class: dense orthonormal basis B (r x d) stored in fp32."""

    def __init__(self, shape, rank: int, gap: int, *, proj_type: str = "std", seed: int = 0, **_):
        m, n = shape
        self.shape = (m, n)
        self.side = SIDE_RULES[proj_type](m, n)
        self.dim = m if self.side == "left" else n
        self.rank = max(1, min(rank, self.dim))
        self.gap = gap
        self.seed = seed
        self.refreshes = 0  # how many times the basis was actually recomputed
        self.basis_fp32 = None  # r x d

    # --- schedule and storage
    def due(self, step: int) -> bool:
        return not self.ready or step % self.gap == 0

    @property
    def ready(self) -> bool:
        return self.basis_fp32 is not None

    def _store(self, basis: torch.Tensor) -> None:
        self.basis_fp32 = basis.float().clone(memory_format=torch.contiguous_format)  # own storage, not the SVD's

    def basis(self) -> torch.Tensor:
        return self.basis_fp32

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.basis_fp32] if self.basis_fp32 is not None else []

    # --- checkpoints: plain values and tensors only, so they load with torch.load(weights_only=True)
    def to_state(self) -> dict:
        return {"kind": type(self).__name__, **vars(self)}

    @staticmethod
    def from_state(state: dict) -> "Projector":
        state = dict(state)
        cls = {c.__name__: c for c in PROJECTORS.values()}[state.pop("kind")]
        projector = cls.__new__(cls)
        vars(projector).update(state)
        projector.shape = tuple(projector.shape)
        return projector

    # --- the projection
    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        """Recompute the basis from ``grad``; returns whether it changed."""
        self._store(self._compute(grad.float(), step))
        self.refreshes += 1
        return True

    def _compute(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        b = self.basis()
        return b @ grad if self.side == "left" else grad @ b.T

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        b = self.basis()
        return b.T @ low if self.side == "left" else low @ b

    def _oriented(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with the projected dimension first (d x other)."""
        return grad if self.side == "left" else grad.T


class SVDProjector(Projector):
    """GaLore: top-r singular vectors of G on the projected side (exact SVD, as galore-torch)."""

    def _compute(self, grad, step):
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return u[:, : self.rank].T if self.side == "left" else vh[: self.rank]


class RandomizedSVDProjector(Projector):
    """torch.svd_lowrank with ``oversample`` extra columns and 2 power iterations; seeded."""

    def __init__(self, shape, rank, gap, *, oversample: int = 8, **kw):
        super().__init__(shape, rank, gap, **kw)
        self.oversample = oversample

    def _compute(self, grad, step):
        q = min(self.rank + self.oversample, min(grad.shape))
        devices = [grad.device] if grad.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # leave the training RNG stream alone
            torch.manual_seed(self.seed * 1_000_003 + step)
            u, _, _ = torch.svd_lowrank(self._oriented(grad), q=q, niter=2)
        return u[:, : self.rank].T


class RandomProjector(Projector):
    """A random orthonormal basis (QR of a seeded Gaussian d x r), new at every refresh."""

    def _compute(self, grad, step):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        gauss = torch.randn(self.dim, self.rank, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(gauss)
        return q.T.to(device=grad.device, dtype=torch.float32)


class IndexProjector(Projector):
    """Keeps only r int64 indices along the projected dimension."""

    def __init__(self, shape, rank, gap, **kw):
        super().__init__(shape, rank, gap, **kw)
        self.indices = None

    @property
    def ready(self) -> bool:
        return self.indices is not None

    def state_tensors(self):
        return [self.indices] if self.indices is not None else []

    def refresh(self, grad, step):
        self.indices = self._choose(grad.float(), step).to(device=grad.device, dtype=torch.int64)
        self.refreshes += 1
        return True


class CoordinateProjector(IndexProjector):
    """FRUGAL coordinate subsets: R is G restricted to r rows (left) or columns (right)."""

    _axis = property(lambda self: 0 if self.side == "left" else 1)

    def project(self, grad):
        return grad.index_select(self._axis, self.indices)

    def project_back(self, low):
        out = low.new_zeros(self.shape)
        return out.index_copy_(self._axis, self.indices, low)


class RandKProjector(CoordinateProjector):
    """r rows/columns drawn uniformly without replacement (seeded) at every refresh."""

    def _choose(self, grad, step):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randperm(self.dim, generator=gen)[: self.rank].sort().values


class BlockProjector(CoordinateProjector):
    """Contiguous rows/columns; each refresh moves to the next block (ascending, wrapping)."""

    def _choose(self, grad, step):
        start = (self.refreshes * self.rank) % self.dim
        return (torch.arange(self.rank) + start) % self.dim


PROJECTORS: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "randomized_svd": RandomizedSVDProjector,
    "random": RandomProjector,
    "randk": RandKProjector,
    "blocks": BlockProjector,
}


def make_projector(name: str, shape, rank: int, gap: int, **kw) -> Projector:
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; valid: {', '.join(PROJECTORS)}")
    return PROJECTORS[name](shape, rank, gap, **kw)
