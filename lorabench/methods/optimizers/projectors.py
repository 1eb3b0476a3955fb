"""Gradient projectors shared by the GaLore family (galore_family.py).

Papers: GaLore (Zhao et al., 2024, arXiv:2403.03507) SVD projection; Q-GaLore (Zhang et al., 2024,
arXiv:2407.08296) INT4 projector storage and lazy layer-adaptive refresh; DCT-AdamW ("SVD-Free
Low-Rank Adaptive Gradient Optimization", arXiv:2505.17967 per METHODS.md, uncertain) DCT columns;
FRUGAL (Zmushko et al., 2025, arXiv:2411.07837) coordinate subsets (RandK, blocks).

A projector of a weight gradient G (m x n) works on one side, by galore-torch's ``proj_type`` rule
(``std``: the smaller dimension, left if m < n else right). Its basis B (r x d, orthonormal rows,
d = the projected dimension) gives

    left:  R = B G (r x n),  project_back(R) = Bᵀ R        right: R = G Bᵀ (m x r),  back = R B

so that back(project(G)) = Bᵀ B G (or G Bᵀ B) and the residual G - back(project(G)) is what
Fira and FRUGAL update without state. ``refresh(G, step)`` recomputes B; the optimizer calls it
when ``due(step)`` (``step % gap == 0``, galore-torch's rule; the lazy SVD projector grows its
own ``gap``). ``state_tensors()`` lists what the projector keeps, for memory accounting: dense
bases in fp32 (or 4/8-bit with one fp32 scale per basis vector), coordinate projectors and DCT
only their r int64 indices (the DCT matrix is shared per optimizer and counted once there).

Hyper-parameters: rank r (GaLore GLUE: 4-8; pre-training 128-1024), gap T (200; GLUE 500),
``oversample`` 8 for randomized SVD, ``bits`` 4 for Q-GaLore, lazy refresh: ``cos_threshold`` 0.4,
``patience`` 5 (the authors' queue size), ``gap_growth`` 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIDE_RULES = {
    "std": lambda m, n: "left" if m < n else "right",
    "reverse_std": lambda m, n: "right" if m < n else "left",
    "left": lambda m, n: "left",
    "right": lambda m, n: "right",
}


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization. 4-bit codes are packed two per uint8; returns (codes, scale)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    q = torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int16)
    if bits == 8:
        return q.to(torch.int8), scale
    flat = (q + 8).to(torch.uint8).flatten()  # codes 1..15
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, shape: tuple[int, int]):
    if bits == 8:
        return codes.float() * scale
    q = torch.stack([codes & 0x0F, codes >> 4], dim=1).flatten()[: shape[0] * shape[1]]
    return (q.float() - 8).view(shape) * scale


def dct_matrix(d: int, device=None) -> torch.Tensor:
    """Orthonormal DCT-II basis as columns: Q[i, j] = c_j cos(pi (i + 1/2) j / d)."""
    i = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    q = torch.cos(math.pi * (i + 0.5) * j / d) * math.sqrt(2.0 / d)
    q[:, 0] = math.sqrt(1.0 / d)
    return q.to(device=device, dtype=torch.float32)


class DCTCache:
    """One DCT matrix per (dimension, device), shared by every DCT projector of an optimizer."""

    def __init__(self):
        self.matrices: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, d: int, device) -> torch.Tensor:
        key = (d, str(device))
        if key not in self.matrices:
            self.matrices[key] = dct_matrix(d, device)
        return self.matrices[key]


class Projector:
    """Base class: dense orthonormal basis B (r x d) stored in fp32 or quantized to ``bits``."""

    def __init__(self, shape, rank: int, gap: int, *, proj_type: str = "std", seed: int = 0, bits: int = 32, **_):
        m, n = shape
        self.shape = (m, n)
        self.side = SIDE_RULES[proj_type](m, n)
        self.dim = m if self.side == "left" else n
        self.rank = max(1, min(rank, self.dim))
        self.gap = gap
        self.bits = bits
        self.seed = seed
        self.refreshes = 0  # how many times the basis was actually recomputed
        self.basis_fp32 = None  # r x d, when bits == 32
        self.codes = None  # quantized basis, when bits in (4, 8)
        self.scale = None

    # --- schedule and storage
    def due(self, step: int) -> bool:
        return not self.ready or step % self.gap == 0

    @property
    def ready(self) -> bool:
        return self.basis_fp32 is not None or self.codes is not None

    def _store(self, basis: torch.Tensor) -> None:
        basis = basis.float().clone(memory_format=torch.contiguous_format)  # own storage, not the SVD's
        if self.bits == 32:
            self.basis_fp32 = basis
        else:
            self.codes, self.scale = quantize_rows(basis, self.bits)

    def basis(self) -> torch.Tensor:
        if self.bits == 32:
            return self.basis_fp32
        return dequantize_rows(self.codes, self.scale, self.bits, (self.rank, self.dim))

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.basis_fp32, self.codes, self.scale) if t is not None]

    # --- checkpoints: plain values and tensors only, so they load with torch.load(weights_only=True)
    def to_state(self) -> dict:
        state = {k: v for k, v in vars(self).items() if k != "cache"}
        return {"kind": type(self).__name__, **state}

    @staticmethod
    def from_state(state: dict, dct_cache: "DCTCache") -> "Projector":
        state = dict(state)
        cls = {c.__name__: c for c in PROJECTORS.values()}[state.pop("kind")]
        projector = cls.__new__(cls)
        vars(projector).update(state)
        projector.shape = tuple(projector.shape)
        if isinstance(projector, DCTProjector):
            projector.cache = dct_cache
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
    """GaLore: top-r singular vectors of G on the projected side (exact SVD, as galore-torch).

    With ``cos_threshold`` set, Q-GaLore's lazy refresh: after each SVD, |cos| between the new and
    the previous leading basis vector; after ``patience`` consecutive values >= the threshold the
    layer's gap is multiplied by ``gap_growth`` (scheduled refreshes in between are skipped)."""

    def __init__(
        self, shape, rank, gap, *, cos_threshold: float | None = None, patience: int = 5, gap_growth: int = 2, **kw
    ):
        super().__init__(shape, rank, gap, **kw)
        self.cos_threshold, self.patience, self.gap_growth = cos_threshold, patience, gap_growth
        self.streak = 0

    def _compute(self, grad, step):
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return u[:, : self.rank].T if self.side == "left" else vh[: self.rank]

    def refresh(self, grad, step):
        previous = self.basis()[0].clone() if (self.ready and self.cos_threshold is not None) else None
        super().refresh(grad, step)
        if previous is not None:
            sim = F.cosine_similarity(previous, self.basis()[0], dim=0).abs().item()
            self.streak = self.streak + 1 if sim >= self.cos_threshold else 0
            if self.streak >= self.patience:
                self.gap *= self.gap_growth
                self.streak = 0
        return True


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


class DCTProjector(IndexProjector):
    """DCT-AdamW: B = Q[:, I]ᵀ for the shared orthonormal DCT-II matrix Q (d x d), I = the top-r
    columns by score ‖Gᵀ Q[:, j]‖ (left) or ‖G Q[:, j]‖ (right); one matmul, no SVD."""

    def __init__(self, shape, rank, gap, *, dct_cache: DCTCache | None = None, **kw):
        super().__init__(shape, rank, gap, **kw)
        self.cache = dct_cache if dct_cache is not None else DCTCache()

    def scores(self, grad: torch.Tensor) -> torch.Tensor:
        q = self.cache.get(self.dim, grad.device)
        return (q.T @ self._oriented(grad.float())).norm(dim=1)

    def _choose(self, grad, step):
        return torch.topk(self.scores(grad), self.rank).indices

    def basis(self):
        return self.cache.get(self.dim, self.indices.device).index_select(1, self.indices).T


PROJECTORS: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "randomized_svd": RandomizedSVDProjector,
    "random": RandomProjector,
    "dct": DCTProjector,
    "randk": RandKProjector,
    "blocks": BlockProjector,
}
DENSE = ("svd", "randomized_svd", "random")  # the ones that can be quantized


def make_projector(name: str, shape, rank: int, gap: int, **kw) -> Projector:
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; valid: {', '.join(PROJECTORS)}")
    if kw.get("bits", 32) != 32 and name not in DENSE:
        raise ValueError(f"projector {name!r} stores indices; quantized storage needs one of {DENSE}")
    return PROJECTORS[name](shape, rank, gap, **kw)
