"""SLTrain (Han et al., 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining", arXiv:2406.02214, NeurIPS 2024), our own layer. Authors' code: andyjm3/SLTrain
(splora/splora_linear.py ``SpLoRaLinear`` with its C++ op sparse-lora/sparse_linear.cpp).

Update rule, as a fine-tuning adapter on a frozen pretrained W0 (d_out x d_in, bias b0):
    h = W0 x + b0 + Delta W x,    Delta W = s B A + S,    s = alpha / r,
with B (d_out x r) and A (r x d_in) trainable and S a sparse d_out x d_in matrix on a random support
Omega fixed at construction: |Omega| = int(delta d_out d_in) flat indices (row-major, i d_in + j), the
first |Omega| entries of a random permutation of 0..d_out d_in - 1, sorted (the authors'
``_init_sparse_parameters``); only S's values on Omega train. Init: A Kaiming uniform with a = sqrt(5)
(U(-1/sqrt(d_in), 1/sqrt(d_in)), nn.Linear's), B = 0, as the authors'. Trainable parameters per target:
r (d_in + d_out) + int(delta d_out d_in), plus the task head.
Forward: the authors form one dense W = B (s A) + scatter(S) and run linear(x, W); here W0 x, s B (A x)
and S x (S scattered into a dense fp32 d_out x d_in matrix, autocast off, then one matmul) are three
terms, summed in the adapter dtype (fp32), so that under bf16 autocast the update is rounded to its own
size, never against W0 (tests/test_bf16_safety.py). Their backward (dense dL/dW, gathered on Omega for S)
is what autograd of the scatter gives.
The support regenerates from the run seed and the layer name (a non-persistent buffer, not saved): it
is drawn with its own generator, so it does not depend on the rank.

Deviations (Fidelity below): SLTrain is a pretraining method whose layer replaces W (and trains its own
bias) from scratch; here it adapts a frozen W0 and b0. The authors' S values start at U(-1/sqrt(d_in),
1/sqrt(d_in)) (with B = 0, their W starts at S0, not 0); for fine-tuning they start at 0 here
(``sltrain_value_init: zero``, so Delta W = 0 and the model is W0 at step 0; ``uniform`` restores the
authors' draw). A, the support and the values are drawn from generators seeded by the run seed and the
layer name, not torch's global generator (same distributions). Left out: ``trainable_scaling`` (s =
tanh of a trainable scalar, off by default in their scripts) and ``lora_dropout`` (accepted by their
layer but never applied). Nothing vision-specific: the method was born on LLaMA language models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.method_params.adapters_sltrain import SltrainParams
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

SLTRAIN_REPO = "andyjm3/SLTrain@2335d62c75df"


def support_size(d_out: int, d_in: int, density: float) -> int:
    """|Omega| = int(delta * d_out * d_in), the authors' ``int(self.sp_ratio * total_elements)``."""
    return int(density * (d_out * d_in))


def draw_support(d_out: int, d_in: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """The authors' support: the first |Omega| entries of a random permutation of the flat indices, sorted."""
    total = d_out * d_in
    index = torch.randperm(total, generator=generator)[: support_size(d_out, d_in, density)]
    return torch.sort(index).values


class SparseLowRankLayer(AdapterLayer):
    """y = W0 x + b0 + s B A x + S x, S = scatter(values on the fixed flat support ``sparse_index``)."""

    def __init__(
        self,
        base: nn.Linear,
        a: torch.Tensor,
        b: torch.Tensor,
        index: torch.Tensor,
        values: torch.Tensor,
        scale: float,
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        if index.ndim != 1 or index.shape != values.shape:
            raise ValueError(f"support {tuple(index.shape)} and values {tuple(values.shape)} must be 1-D and match")
        self.lora_A = nn.Parameter(a.to(device, dtype).clone())
        self.lora_B = nn.Parameter(b.to(device, dtype).clone())
        # regenerates from the run seed and the layer name: not saved with the adapter
        self.register_buffer("sparse_index", index.to(device, torch.long).contiguous(), persistent=False)
        self.sparse_value = nn.Parameter(values.to(device, dtype).clone())
        self.scale = scale

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense d_out x d_in matrix in the adapter dtype (differentiable in the values)."""
        v = self.sparse_value
        flat = v.new_zeros(self.out_features * self.in_features).scatter(0, self.sparse_index, v)
        return flat.view(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return self.scale * (self.lora_B @ self.lora_A) + self.sparse_weight()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A.dtype
        h = x.to(dtype)
        out = (self.scale * ((h @ self.lora_A.T) @ self.lora_B.T)).to(dtype)
        if self.sparse_index.numel():
            with torch.autocast(h.device.type, enabled=False):
                s = self.sparse_weight()
            out = out + nn.functional.linear(h, s).to(dtype)  # its own term (bf16 matmul under autocast)
        return out.to(x.dtype)


@ADAPTERS.register("sltrain")
class SltrainAdapter(OwnAdapter):
    Params = SltrainParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py); the sparse part follows the density
    paper = "Han et al., 2024, arXiv:2406.02214"
    fidelity = Fidelity(
        reference=f"{SLTRAIN_REPO} (splora/splora_linear.py SpLoRaLinear, sparse-lora/sparse_linear.cpp)",
        status="parity",
        tolerance="max |Δ| / max(1, |ref|) <= 1e-6 of outputs, gradients, tensors over 12 AdamW steps (fp32, CPU);"
        " support draw identical for the same generator state",
        fixture="tests/fixtures/parity/sltrain.json",
        deviations=(
            "fine-tuning: the layer adds s B A + S to a frozen W0 and b0; the authors' layer replaces W (and"
            " trains its own bias) for pretraining from scratch",
            "the sparse values start at 0 (Delta W = 0 at step 0), not the authors' U(-1/sqrt(d_in), 1/sqrt(d_in))"
            " pretraining draw (sltrain_value_init: uniform restores it)",
            "A, the support and the values are drawn from generators seeded by the run seed and the layer name,"
            " not torch's global generator: same distributions and procedure (randperm prefix, sorted)",
            "defaults rank 8, alpha 16 (LoRA's here) and density 0.03 (the authors' pretraining value; they have no"
            " fine-tuning setting); their scripts pretrain with r = 128..1024, lora_alpha 32..8",
            "S x is its own term (dense fp32 S, one matmul) beside W0 x and s B A x; the authors fold s B A + S into"
            " one dense W (the same function in fp32)",
            "weight decay > 0 skips the 1-D sparse values (lorabench's decay groups); the authors decay every"
            " tensor alike and run with weight decay 0",
        ),
        unchecked=(
            "trainable_scaling (s = tanh of a trainable scalar; off in the authors' scripts) is not implemented",
            "lora_dropout: accepted by the authors' layer but never applied, so absent here",
            "the authors' bf16 path (their op casts x to the weights' dtype) is not compared; ours is checked"
            " by tests/test_bf16_safety.py",
        ),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: SltrainParams, ctx: MethodContext) -> SparseLowRankLayer:
        d_out, d_in, r = linear.out_features, linear.in_features, params.rank
        gen = seeded_generator(ctx.seed, name)
        a = kaiming_uniform(r, d_in, gen)
        b = torch.zeros(d_out, r)
        index = draw_support(d_out, d_in, params.sltrain_density, seeded_generator(ctx.seed, f"{name}.sparse_index"))
        values = torch.zeros(index.numel())
        if params.sltrain_value_init == "uniform":
            bound = 1.0 / math.sqrt(d_in)
            values = (torch.rand(index.numel(), generator=gen) * 2 - 1) * bound
        return SparseLowRankLayer(linear, a, b, index, values, params.alpha / r)

    def layer_trainable(self, d_out: int, d_in: int, params: SltrainParams) -> int:
        return params.rank * (d_in + d_out) + support_size(d_out, d_in, params.sltrain_density)
