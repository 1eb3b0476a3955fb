"""NOLA (Koohpayegani et al., 2024, "NOLA: Compressing LoRA using Linear Combination of Random
Basis", first titled "NOLA: Networks as Linear Combination of Low Rank Random Basis",
arXiv:2310.02556), our own layer.

Update rule: A = sum_{i=1..k} alpha_i A_i and B = sum_{j=1..l} beta_j B_j, Delta W = s B A, where the
bases A_i (r x d_in) and B_j (d_out x r) are frozen random matrices regenerated from a seed
(``basis_seed`` and the layer's name; never saved) and only the k + l coefficients per layer train
(independent of rank and width), plus the task head. s = alpha / r.
Init: alpha ~ U(-1/sqrt(k), 1/sqrt(k)) and beta = 0, so Delta W = 0 at step 0 as in LoRA; bases
A_i ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (nn.Linear's init) and B_j ~ U(-1/sqrt(r), 1/sqrt(r)). (The
authors' ViT code starts both coefficient vectors at 1/k, a small non-zero Delta W at init.)
Hyper-parameters: rank r (GPT-2 E2E scripts: 4-8 on q, v), num_basis_a = k and num_basis_b = l
(about 1000 per layer in the paper; uncertain, 1024 here), alpha, a larger lr than LoRA. Quantised
coefficients (an option in the paper) are not implemented.
Memory: the bases take k r d_in + l d_out r values per layer (buffers, not parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS


def nola_bases(
    seed: int, name: str, k: int, l: int, r: int, d_in: int, d_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen bases of one layer, (k, r, d_in) and (l, d_out, r), from the seed and layer name."""
    gen = seeded_generator(seed, "nola:" + name)
    basis_a = (torch.rand(k, r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)
    basis_b = (torch.rand(l, d_out, r, generator=gen) * 2 - 1) / math.sqrt(r)
    return basis_a, basis_b


class NolaLayer(AdapterLayer):
    def __init__(
        self, base: nn.Linear, bases: tuple[torch.Tensor, torch.Tensor], scale: float, generator: torch.Generator
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        basis_a, basis_b = bases
        k, l = basis_a.shape[0], basis_b.shape[0]
        self.register_buffer("basis_A", basis_a.to(device, dtype), persistent=False)
        self.register_buffer("basis_B", basis_b.to(device, dtype), persistent=False)
        self.coef_A = nn.Parameter(((torch.rand(k, generator=generator) * 2 - 1) / math.sqrt(k)).to(device, dtype))
        self.coef_B = nn.Parameter(torch.zeros(l, device=device, dtype=dtype))
        self.scale = scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.einsum("k,krd->rd", self.coef_A, self.basis_A)
        b = torch.einsum("l,lor->or", self.coef_B, self.basis_B)
        return b, a

    def delta_weight(self) -> torch.Tensor:
        b, a = self.factors()
        return self.scale * b @ a

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a = self.factors()
        return (self.scale * (x.to(a.dtype) @ a.T) @ b.T).to(x.dtype)


@dataclass
class NolaParams:
    rank: int = 8
    num_basis_a: int = 1024  # k
    num_basis_b: int = 1024  # l
    alpha: float = 16.0
    basis_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("rank", "num_basis_a", "num_basis_b", "alpha"):
            check_positive(f"method.{key}", getattr(self, key))


@ADAPTERS.register("nola")
class NolaAdapter(OwnAdapter):
    Params = NolaParams
    size_knob = ("num_basis_a", "num_basis_b")  # what a size budget sets (lorabench/budget.py)
    paper = "Koohpayegani et al., 2024, arXiv:2310.02556"

    def make_layer(self, name: str, linear: nn.Linear, params: NolaParams, ctx: MethodContext) -> NolaLayer:
        bases = nola_bases(
            params.basis_seed,
            name,
            params.num_basis_a,
            params.num_basis_b,
            params.rank,
            linear.in_features,
            linear.out_features,
        )
        return NolaLayer(linear, bases, params.alpha / params.rank, seeded_generator(ctx.seed, "nola-coef:" + name))

    def layer_trainable(self, d_out: int, d_in: int, params: NolaParams) -> int:
        return params.num_basis_a + params.num_basis_b
