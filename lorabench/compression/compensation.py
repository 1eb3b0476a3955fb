"""Compensations of a compression error ΔW = W - W_c by rank-r factors B (out x r), A (r x in) with
B A ≈ ΔW, each registered in ``COMPENSATIONS``. The run's LoRA layer on the compressed base then
starts from them (lorabench.protocols.compressed), so the compressed model plus the adapter
computes (W_c + B A) x before any training.

* ``none``: no compensation: the adapter keeps its own initialisation (peft's LoRA: B = 0), as
  QLoRA fine-tunes a quantized base.
* ``svd``: the truncated SVD of the error, ΔW ≈ U_r Σ_r V_rᵀ, split B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ
  (the plain low-rank compensation the EoRA paper compares with; its released code's
  ``llama_sequential_svd``). It minimises ‖ΔW - B A‖_F, blind to the inputs.
* ``lq_lora``: LQ-LoRA's low-rank plus compressed decomposition (:func:`lq_decompose`): the
  compressed weight is fitted around the factors, W ≈ Q + B A, alternating an SVD of W - Q and a
  compression of W - B A (the reference quantizes with its blockwise NormalFloat; here the run's
  compressor, e.g. HQQ; the reference's randomized SVD is an exact one here).
* ``loftq``: LoftQ's alternation (:func:`loftq_decompose`): compression first, then the SVD of
  the residual, ``iterations`` times without a stop rule (peft's ``loftq_init``, whose NF4 comes
  from bitsandbytes' CUDA kernels; here the run's compressor).
* ``eora``: EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with
  Eigenspace Low-Rank Approximation"; NVlabs/EoRA ``llama_sequential_eigen``). From the layer's
  calibration inputs X, the second-moment matrix C = XᵀX is eigendecomposed, C = Q Λ Qᵀ; the error
  is projected into the scaled eigenspace, ΔW' = ΔW Q Λ^½, truncated by SVD, ΔW' ≈ U_r Σ_r V_rᵀ,
  and mapped back: B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ Λ^{-½} Qᵀ. It minimises ‖(ΔW - B A) Xᵀ‖_F, the
  error of the layer's outputs on the calibration data. As in the reference: C and its eigh in
  float64, eigenvalues ≤ 0 replaced by the smallest positive one (the reference replaces those
  < 0), the projection and SVD in float32; A in an equal, stable form (:func:`eora_factors`).

The second moments follow the reference's running update over calibration sequences,
C ← C · n/(n+1) + XᵢᵀXᵢ / n with n the number of sequences (:class:`InputMoments`); a sequence's
padding positions are left out (the reference's sequences have none).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from lorabench.compression import COMPENSATIONS


@dataclasses.dataclass(frozen=True)
class Compensation:
    fn: Callable | None  # (delta, moments or None, rank) -> (B, A); None: no compensation
    needs_inputs: bool  # whether it reads the layer's calibration input moments
    alternating: bool = False  # the compressed weight is re-fitted around the factors (lq_decompose)
    quantize_first: bool = False  # alternating: LoftQ's order (loftq_decompose) instead of LQ-LoRA's


def split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r Σ_r^½ and A = Σ_r^½ V_rᵀ from an SVD."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factors(delta: torch.Tensor, moments: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW ≈ B A by the truncated SVD of ΔW (float32)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return split_sqrt(u, s, vh, rank)


def eora_factors(delta: torch.Tensor, moments: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's B, A for error ``delta`` (out x in) and input second moments ``moments`` (in x in).

    A is computed as Σ_r^{-½} U_rᵀ ΔW, which equals the paper's Σ_r^½ V_rᵀ Λ^{-½} Qᵀ in exact
    arithmetic (Σ_r V_rᵀ = U_rᵀ ΔW Q Λ^½, and Q Λ^½ Λ^{-½} Qᵀ = I whatever the clamped eigenvalues
    are) without dividing by small eigenvalues: with fewer calibration tokens than input features
    the moments are singular, and the reference's form multiplies float32 rounding in V_r by
    λ^{-½} ≈ 10⁴–10⁶ (on MiniLM with 180 calibration tokens: ‖ΔW - B A‖ 70× ‖ΔW‖, output error
    six times the uncompensated one). So B A = U_r U_rᵀ ΔW: ΔW projected on the output directions
    that matter most on the calibration inputs."""
    eigenvalues, q = torch.linalg.eigh(moments.double())
    positive = eigenvalues[eigenvalues > 0]
    if positive.numel() == 0:
        raise ValueError(
            "EoRA: the calibration inputs of a layer are all zero; its moments have no positive eigenvalue"
        )
    eigenvalues = torch.where(eigenvalues > 0, eigenvalues, positive.min())
    scaling = (q * eigenvalues.sqrt()).float()  # Q Λ^½
    u, s, _ = torch.linalg.svd(delta.float() @ scaling, full_matrices=False)
    root = s[:rank].sqrt()
    inverse_root = torch.where(root > 0, 1 / root, torch.zeros_like(root))
    return u[:, :rank] * root, inverse_root[:, None] * (u[:, :rank].T @ delta.float())


COMPENSATIONS.register("none")(Compensation(None, needs_inputs=False))
COMPENSATIONS.register("svd")(Compensation(svd_factors, needs_inputs=False))
COMPENSATIONS.register("eora")(Compensation(eora_factors, needs_inputs=True))
COMPENSATIONS.register("lq_lora")(Compensation(svd_factors, needs_inputs=False, alternating=True))
COMPENSATIONS.register("loftq")(Compensation(svd_factors, needs_inputs=False, alternating=True, quantize_first=True))


def lq_decompose(weight: torch.Tensor, compress: Callable, rank: int, iterations: int):
    """LQ-LoRA's alternation (Guo et al. 2023, "LQ-LoRA: Low-rank Plus Quantized Matrix
    Decomposition"; HanGuo97/lq-lora ``lowrank_quantized_sparse_decomposition``): from Q = 0,
    repeat L = SVD_r(W - Q), Q = compress(W - L), until ‖W - (L + Q)‖_F rises or ``iterations``
    are done. As in the reference the iterate that raised the error is the one returned, and the
    factors split Σ_r as Σ_r^½ into both. ``compress(w)`` returns the Compressed of a layer holding
    ``w``. Returns (the last Compressed, (B, A), iterations run, the final error ‖W - (L + Q)‖_F)."""
    w = weight.float()
    q = torch.zeros_like(w)
    last, done = float("inf"), 0
    for _ in range(iterations):
        done += 1
        b, a = svd_factors(w - q, None, rank)
        result = compress((w - b @ a).to(weight.dtype))
        q = result.weight.float()
        error = float((w - b @ a - q).norm())
        if error > last:
            break
        last = error
    return result, (b, a), done, error


class InputMoments:
    """Forward hooks that gather every watched linear layer's input second moments over
    calibration sequences (the running update of the module docstring). Set :attr:`mask` to the
    batch's attention mask before each forward; ``sequences`` is n, the number of calibration
    sequences the update divides by."""

    def __init__(self, modules: dict[str, nn.Module], sequences: int):
        self.sequences, self.mask = sequences, None
        self.moments: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().double()
            if x.dim() == 2:
                x = x.unsqueeze(0)
            moments = self.moments.get(name)
            if moments is None:
                moments = self.moments[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
            n = self.sequences
            for i, seq in enumerate(x):
                if self.mask is not None:
                    seq = seq[self.mask[i].bool().to(seq.device)]
                moments.mul_(n / (n + 1)).add_((seq.T @ seq).cpu() / n)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def loftq_decompose(weight: torch.Tensor, compress: Callable, rank: int, iterations: int):
    """LoftQ's alternation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"; peft's
    ``loftq_init``): from B A = 0, ``iterations`` times Q = compress(W - B A), then B A = SVD_r(W - Q),
    with no stop rule (peft's default is one iteration: Q = compress(W), B A = SVD_r(W - Q)).
    Returns what :func:`lq_decompose` returns."""
    w = weight.float()
    low_rank = torch.zeros_like(w)
    for _ in range(iterations):
        result = compress((w - low_rank).to(weight.dtype))
        b, a = svd_factors(w - result.weight.float(), None, rank)
        low_rank = b @ a
    return result, (b, a), iterations, float((w - low_rank - result.weight.float()).norm())
