"""WaRA (Heidari et al., 2025, "WaRA: Wavelet Low Rank Adaptation", arXiv:2506.24092), our own layer.
Authors' code: moeinheidari7829/WaRA (not retrievable here; see ``fidelity``).

The paper's rule (v1, Fig. 1): the input X (d_in x k: features x tokens) is split by a fixed one-level
2-D DWT into four subbands C_LL, C_LH, C_HL, C_HH (each about d_in/2 x k/2); one low-rank pair,
A (r x d_in/2) and B (d_out/2 x r), maps every subband, and the 2-D IDWT of the four results is the
update added to the frozen layer's output:

    y = W0 X + b0 + s IDWT2(B A C_LL, B A C_LH, B A C_HL, B A C_HH),   s = alpha / r.

As a weight. Write the one-level analysis along an axis of length n as the two band operators P_L, P_H
(n_b x n) and the synthesis as S_L, S_H (n x n_b), with perfect reconstruction S_L P_L + S_H P_H = I.
The separable 2-D transform acts on the feature axis from the left and on the token axis from the right,
and B A only on the feature axis, so the token-axis analysis and synthesis meet and cancel:

    Delta W = s (S_L B A P_L + S_H B A P_H)        (d_out x d_in; P on d_in, S on d_out),

i.e. y = W0 x + b0 + s IDWT1(B A DWT1_L(x), B A DWT1_H(x)): a 1-D DWT of each token's features, the
shared rank-r map on both bands, a 1-D IDWT onto the output features. For Haar with even widths (every
model here) P = S^T (orthonormal), and Delta W is the 2-D IDWT of a d_out x d_in coefficient
array whose LL and HH quadrants both hold B A (LH = HL = 0): Delta W = s IDWT2([[B A, 0], [0, B A]]),
the abstract's "low-rank factorization in the wavelet domain, reconstructed through an inverse
transform". Written out for Haar on even widths it is Delta W = s (B A) kron I_2: even output features
read even input features, odd read odd, through the same B A (tests/test_wara.py's hand-computed case);
longer wavelets mix neighbouring pairs. rank(Delta W) <= 2r with r (n_in + n_out) ~ r (d_in + d_out) / 2
trainable values.
Init: A nn.Linear's Kaiming uniform (U(+-1/sqrt(n_in))), B = 0, so Delta W = 0 at step 0.

Implemented detail: the transforms are ptwt's (PyTorch on PyWavelets' filters; ``wara_wavelet``
default ``haar``, one level, boundary mode ``wara_mode``, default ``zero``). A band has
n_b = ptwt's coefficient length for the width (ceil(d / 2) for Haar), so an odd width pads one sample
at the edge (by the mode) and the IDWT's 2 n_b outputs are cut to d_out. ``adapter_forward`` never forms
Delta W: a DWT and an IDWT of O(d) per token in float32 (autocast off) around four thin matmuls,
2 r (n_in + n_out) ~ r (d_in + d_out) multiply-adds per token, LoRA's count at the same rank (on one CPU
thread at d = 1024, 512 tokens, r 8 the two transforms take ~2/3 of the frozen layer's own forward);
``delta_weight()`` runs that path on the d_in x d_in identity (O(d_in r (d_in + d_out)), as LoRA's B A).

From vision to text: WaRA was built for ViT/SAM/diffusion layers, whose token axis is a spatial one.
Because the token-axis transform cancels exactly, the update here is a per-token linear map on any
``nn.Linear`` target (query/value by default): no mixing across tokens (so causal LMs stay causal) and
mergeable into W0. Left out: the later revision's layout (patch tokens reshaped into an H x W grid and
transformed over the grid, which needs an image's token layout; with one adapter shared by the four
subbands, as its abstract says, the same cancellation would leave plain LoRA), Tiny-WaRA (its SVD basis),
multi-level transforms (the bands' sizes differ, so one A and B cannot be shared) and the vision
backbones' own placements (e.g. SAM's fused qkv).
"""

from __future__ import annotations

from functools import lru_cache

import ptwt
import torch
from torch import nn

from lorabench.method_params.adapters_wara import WaraParams
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


@lru_cache(maxsize=None)
def band_length(width: int, wavelet: str, mode: str) -> int:
    """How many coefficients ptwt's one-level DWT gives each band of a length-``width`` signal."""
    return ptwt.wavedec(torch.zeros(1, width, dtype=torch.float64), wavelet, mode=mode, level=1)[0].shape[-1]


class WaraLayer(AdapterLayer):
    """y = W0 x + b0 + s IDWT1(B A DWT1_L(x), B A DWT1_H(x)) along the feature axes."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, wavelet: str, mode: str, generator: torch.Generator):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        d_out, d_in = base.out_features, base.in_features
        self.wavelet, self.mode, self.scale = wavelet, mode, scale
        self.n_in, self.n_out = band_length(d_in, wavelet, mode), band_length(d_out, wavelet, mode)
        self.wara_A = nn.Parameter(kaiming_uniform(rank, self.n_in, generator).to(device, dtype))
        self.wara_B = nn.Parameter(torch.zeros(self.n_out, rank, device=device, dtype=dtype))

    def bands(self, h: torch.Tensor) -> torch.Tensor:
        """(2, ..., n_in): the low and high band of the one-level DWT along the last axis (autocast off)."""
        with torch.autocast(h.device.type, enabled=False):
            return torch.stack(ptwt.wavedec(h, self.wavelet, mode=self.mode, level=1))

    def synthesis(self, u: torch.Tensor) -> torch.Tensor:
        """(..., d_out): the one-level IDWT of the bands u[0] (low) and u[1] (high), cut to d_out."""
        with torch.autocast(u.device.type, enabled=False):
            u = u.to(self.wara_A.dtype)
            return ptwt.waverec([u[0], u[1]], self.wavelet)[..., : self.out_features]

    def update(self, h: torch.Tensor) -> torch.Tensor:
        """s IDWT1(B A DWT1(h)) for h (..., d_in) in the adapter's dtype; the matmuls follow autocast."""
        u = (self.bands(h) @ self.wara_A.T) @ self.wara_B.T
        return self.scale * self.synthesis(u)

    def delta_weight(self) -> torch.Tensor:
        with torch.autocast(self.wara_A.device.type, enabled=False):
            eye = torch.eye(self.in_features, device=self.wara_A.device, dtype=self.wara_A.dtype)
            return self.update(eye).T.contiguous()  # row i of update(I) is Delta W e_i

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.update(x.to(self.wara_A.dtype)).to(x.dtype)


@ADAPTERS.register("wara")
class WaraAdapter(OwnAdapter):
    Params = WaraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Heidari et al., 2025, arXiv:2506.24092"
    fidelity = Fidelity(
        reference="arXiv:2506.24092v1 Fig. 1 (DWT2 of the input, one B A shared by the four subbands, IDWT2);"
        " the authors' moeinheidari7829/WaRA could not be fetched here",
        status="rule",
        tolerance="vs the Fig. 1 pipeline run literally (2-D over features x tokens) on PyWavelets and on"
        " pytorch_wavelets: max |Δ| / max(1, |ref|) <= 1e-9 of outputs, Delta W and gradients (float64, CPU)",
        fixture="tests/fixtures/parity/wara.json",
        deviations=(
            "the 2-D transform's token axis is dropped: it cancels exactly (perfect reconstruction) because one"
            " B A maps every subband, so the update is the 1-D feature-axis form (identical numbers, no token mixing)",
        ),
        unchecked=(
            "the authors' code: the wavelet family, boundary mode, scaling s and the init of A and B are our"
            " reading (Haar, zero mode, alpha / r, Kaiming-uniform A and zero B as LoRA); the fixture pins the"
            " paper's pipeline, not their module",
            "the later revision's grid layout (tokens reshaped to H x W, DWT over the grid) and Tiny-WaRA",
        ),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: WaraParams, ctx: MethodContext) -> WaraLayer:
        return WaraLayer(
            linear,
            params.rank,
            params.alpha / params.rank,
            params.wara_wavelet,
            params.wara_mode,
            seeded_generator(ctx.seed, name),
        )

    def layer_trainable(self, d_out: int, d_in: int, params: WaraParams) -> int:
        wavelet, mode = params.wara_wavelet, params.wara_mode
        return params.rank * (band_length(d_in, wavelet, mode) + band_length(d_out, wavelet, mode))

    def size_limit(self, shapes: list[tuple[int, int]], params: WaraParams) -> int:
        """Budget cap: B A maps n_in -> n_out band coefficients, so r <= min(n_out, n_in) of the widest target."""
        wavelet, mode = params.wara_wavelet, params.wara_mode
        return max(min(band_length(o, wavelet, mode), band_length(i, wavelet, mode)) for o, i in shapes)
