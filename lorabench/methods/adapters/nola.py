"""NOLA (Koohpayegani et al., 2024, "NOLA: Compressing LoRA using Linear Combination of Random
Basis", first titled "NOLA: Networks as Linear Combination of Low Rank Random Basis",
arXiv:2310.02556), our own layer; checked against the authors' GPT-2 layer (UCDvision/NOLA
``gpt/src/model_nola.py``: ``LoRA`` with ``use_nola``, ``NOLALinear``, ``GenerateParams``; their LLaMA
code ``llama/peft/tuners/lora.py`` has the same layer) by tests/test_parity_sora_salt_nola.py.

Update rule: A = A0 + sum_{i=1..k} alpha_i A_i and B = sum_{j=1..l} beta_j B_j, Delta W = s B A
(forward ((x A^T) B^T) s), s = alpha / r. A0 (r x d_in) is a frozen LoRA-style A, Kaiming uniform
with a = sqrt(5) (U(-1/sqrt(d_in), 1/sqrt(d_in))), drawn from the run seed and the layer name; B has
no frozen part (the authors' zero B weight). The bases are frozen: A_i = U_i(-1, 1) / sqrt(k)
(k x r x d_in) and B_j = U_j(-1, 1) / sqrt(l) (l x d_out x r), each set drawn as the authors draw it
(``uniform_(-1, 1)`` on a CPU generator seeded with an integer seed, times 1/sqrt(number of bases));
the two integer seeds of a layer come from ``basis_seed`` and the layer's name (the authors draw them
at random and store them in the checkpoint). Only the k + l coefficients per layer train
(independent of rank and width), plus the task head; both start at 0 (the authors' init), so
Delta W = 0 at step 0 and the first gradient reaches beta only. Bases and A0 regenerate from the
seeds and are never saved. (The authors' ViT code, ``vit/NOLA.py``, is a different variant with its
own init; it is not the reference here.)
Hyper-parameters (authors' GPT-2 M E2E script ``gpt/scripts/finetune_gpt2m_e2e_qv_nola.sh``): rank 8,
num_basis 512 for A and for B, lora_alpha 8 (s = 1), lr 5e-3, on q and v; GPT-2 L: 256 bases,
alpha 2, lr 1e-2; LLaMA-2: 512 bases, r 16, alpha 4, lr 1e-3.
Memory: the bases take k r d_in + l d_out r values per layer (buffers, not parameters; the authors
regenerate them in every forward and backward instead).

Quantised coefficients (``coef_bits``, default null = off; ``quant_aware``, default true). Sources: a
third-party summary of the paper (sciencestack.ai/paper/2310.02556) says the coefficients can be
quantised (e.g. to 4 bits) with little loss; the authors' GPT-2 code (UCDvision/NOLA 03c7027,
gpt/src/gpt2_ft.py) has the flags ``--qnola`` ("quantized aware training") and ``--qbits`` (default 2),
but the released model code only threads them through and never quantises, and the ViT utils'
``normalize_int`` (symmetric abs-max to +-7 / +-127, 4 / 8 bits) is imported but unused. The paper's
text on the exact quantiser (and its QAT-vs-PTQ table, recalled as 4 and 3 bits on GPT-2 E2E) could not
be read here, so the rule below is lorabench's choice of the standard uniform quantiser, not a verified
copy:
  per layer and per vector c (coef_A and coef_B separately), b = coef_bits in {2..8}, L = 2^b - 1,
  lo = min(c), step = (max(c) - lo) / L, code = clamp(round_half_even((c - lo) / step), 0, L) (all
  codes 0 when step = 0), and the coefficients used are q = lo + step * code, so |q - c| <= step / 2.
* quant_aware=true (QAT): every forward, training included, uses q; the backward is the
  straight-through estimator dL/dc = dL/dq (lo and step are not differentiated). The optimizer keeps
  the full-precision latent c (resume checkpoints save c, not the codes).
* quant_aware=false (post-training quantisation): training uses c; in eval mode (and for merge and
  delta_weight outside training) q of the current c is used, so evaluated metrics are those of the
  stored adapter.
The adapter file then holds, per layer and vector, the codes bit-packed (ceil(n b / 8) uint8 bytes,
LSB first) and [lo, step] in the coefficient dtype, instead of the float coefficients; loading pins
exactly those q (bit-for-bit outputs) until the coefficients are modified. The record's
method_report has ``nola_coef_storage_bytes`` (coefficients only, quantised or not).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorabench.method_params.adapters import COEF_BITS, NolaParams  # noqa: F401  (COEF_BITS re-exported)
from lorabench.methods.adapters.dylora import kaiming_uniform
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, adapter_layers, seeded_generator
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


def basis_seeds(seed: int, name: str) -> tuple[int, int]:
    """The integer seeds of a layer's A and B bases, from ``basis_seed`` and the layer name."""
    a, b = torch.randint(10**10, (2,), generator=seeded_generator(seed, "nola:" + name)).tolist()
    return a, b


def random_basis(seed: int, num: int, rows: int, cols: int) -> torch.Tensor:
    """num frozen (rows x cols) bases: U(-1, 1) from a CPU generator seeded with ``seed``, times 1/sqrt(num)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.empty(num, rows, cols).uniform_(-1.0, 1.0, generator=gen) * (1.0 / math.sqrt(num))


def nola_bases(
    seed: int, name: str, k: int, l: int, r: int, d_in: int, d_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen bases of one layer, (k, r, d_in) and (l, d_out, r), from ``basis_seed`` and the layer name."""
    seed_a, seed_b = basis_seeds(seed, name)
    return random_basis(seed_a, k, r, d_in), random_basis(seed_b, l, d_out, r)


def quantize_coefs(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform min/max quantisation of one coefficient vector: (codes uint8, lo, step), 0-d lo and step."""
    c = c.detach()
    levels = 2**bits - 1
    lo = c.min()
    step = (c.max() - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))  # step = 0: all c equal lo, all codes 0
    codes = torch.round((c - lo) / safe).clamp_(0, levels)
    return codes.to(torch.uint8), lo, step


def dequantize_coefs(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return lo + step * codes.to(lo.dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes as a bit stream in uint8 bytes (each code LSB first), ceil(n b / 8) bytes."""
    planes = ((codes.cpu().long()[:, None] >> torch.arange(bits)) & 1).flatten()
    planes = nn.functional.pad(planes, (0, (-planes.numel()) % 8))
    return (planes.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    planes = ((packed.cpu().long()[:, None] >> torch.arange(8)) & 1).flatten()[: n * bits]
    return (planes.view(n, bits) << torch.arange(bits)).sum(1).to(torch.uint8)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantised q (exactly); backward: the gradient passes to c unchanged."""

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class NolaLayer(AdapterLayer):
    def __init__(
        self,
        base: nn.Linear,
        bases: tuple[torch.Tensor, torch.Tensor],
        lora_a0: torch.Tensor,
        scale: float,
        coef_bits: int | None = None,
        quant_aware: bool = True,
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        basis_a, basis_b = bases
        k, l = basis_a.shape[0], basis_b.shape[0]
        self.register_buffer("basis_A", basis_a.to(device, dtype), persistent=False)
        self.register_buffer("basis_B", basis_b.to(device, dtype), persistent=False)
        self.register_buffer("lora_A0", lora_a0.to(device, dtype), persistent=False)
        self.coef_A = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))
        self.coef_B = nn.Parameter(torch.zeros(l, device=device, dtype=dtype))
        self.scale = scale
        self.coef_bits = coef_bits
        self.quant_aware = quant_aware
        # name -> (param version, codes, lo, step, q): the quantisation loaded from a file
        self._pinned: dict[str, tuple] = {}
        self._merged_coefs: tuple[torch.Tensor, torch.Tensor] | None = None

    def quantised_now(self) -> bool:
        return self.coef_bits is not None and (self.quant_aware or not self.training)

    def quant_state(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, lo, step, q) of coef_A or coef_B: the pinned ones while the parameter is unchanged."""
        param = getattr(self, name)
        pinned = self._pinned.get(name)
        if pinned is not None:
            version, codes, lo, step, q = pinned
            if version != param._version and torch.equal(param.detach(), q.to(param.device)):
                version = param._version  # e.g. moved or re-copied but still on the loaded grid
            if version == param._version:
                moved = tuple(t.to(param.device) for t in (codes, lo, step, q))
                self._pinned[name] = (version, *moved)
                return moved
            del self._pinned[name]
        codes, lo, step = quantize_coefs(param, self.coef_bits)
        return codes, lo, step, dequantize_coefs(codes, lo, step)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The coefficient vectors the update uses: c, or its quantisation q (straight-through gradient)."""
        if not self.quantised_now():
            return self.coef_A, self.coef_B
        return tuple(_StraightThrough.apply(getattr(self, n), self.quant_state(n)[3]) for n in ("coef_A", "coef_B"))

    def factors(self, coefs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        coef_a, coef_b = coefs if coefs is not None else self.coefficients()
        a = torch.einsum("k,krd->rd", coef_a, self.basis_A) + self.lora_A0
        b = torch.einsum("l,lor->or", coef_b, self.basis_B)
        return b, a

    def delta_weight(self, coefs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, a = self.factors(coefs)
        return self.scale * b @ a

    @torch.no_grad()
    def merge(self) -> None:
        """Remembers the coefficients it folded in, so unmerge subtracts the same Delta W whatever the mode."""
        if not self.merged:
            self._merged_coefs = tuple(c.detach().clone() for c in self.coefficients())
            self.base.weight.add_(self.delta_weight(self._merged_coefs).to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self.delta_weight(self._merged_coefs).to(self.base.weight.dtype))
            self.merged, self._merged_coefs = False, None

    def packed_tensors(self) -> dict[str, torch.Tensor] | None:
        if self.coef_bits is None:
            return None
        out = {}
        for name in ("coef_A", "coef_B"):
            codes, lo, step, _ = self.quant_state(name)
            out[f"{name}_codes"] = pack_codes(codes, self.coef_bits)
            out[f"{name}_qparams"] = torch.stack([lo, step]).cpu()
        return out

    @torch.no_grad()
    def unpack_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in ("coef_A", "coef_B"):
            param = getattr(self, name)
            codes = unpack_codes(tensors[f"{name}_codes"], self.coef_bits, param.numel()).to(param.device)
            lo, step = tensors[f"{name}_qparams"].to(param.device, param.dtype).unbind()
            q = dequantize_coefs(codes, lo, step)
            param.copy_(q)
            self._pinned[name] = (param._version, codes, lo, step, q)

    def coef_storage_bytes(self) -> int:
        """Bytes the coefficients take in the adapter file (safetensors header not counted)."""
        total = 0
        for param in (self.coef_A, self.coef_B):
            if self.coef_bits is None:
                total += param.numel() * param.element_size()
            else:
                total += math.ceil(param.numel() * self.coef_bits / 8) + 2 * param.element_size()
        return total

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a = self.factors()
        return (((x.to(a.dtype) @ a.T) @ b.T) * self.scale).to(x.dtype)


@ADAPTERS.register("nola")
class NolaAdapter(OwnAdapter):
    Params = NolaParams
    size_knob = ("num_basis_a", "num_basis_b")  # what a size budget sets (lorabench/budget.py)
    paper = "Koohpayegani et al., 2024, arXiv:2310.02556"
    fidelity = Fidelity(
        reference="UCDvision/NOLA@03c7027c244b gpt/src/model_nola.py (LoRA with use_nola, NOLALinear, GenerateParams)",
        status="parity",
        tolerance="bases bit-for-bit from the reference's seeds; probe outputs and gradients <= 1e-6 + 1e-5"
        " max|ref|, max |Δθ| <= 1e-6 over 12 AdamW steps (fp32, CPU; all 0 seen)",
        fixture="tests/fixtures/parity/nola.json",
        deviations=(
            "the two basis seeds of a layer derive from basis_seed and the layer name (the authors draw them from"
            " the global generator and store them in the checkpoint); A0 derives from the run seed and the"
            " layer name and is not saved (the authors save it with the model)",
            "bases are drawn once on the CPU and kept as buffers; the authors regenerate them in every forward"
            " and backward on the coefficients' device",
        ),
        unchecked=(
            "on CUDA the authors draw the bases with the CUDA generator (other numbers, same distribution);"
            " ours are CPU draws wherever the model runs",
            "A0's Kaiming draw comes from our generator: same distribution, the parity test copies the reference's A0",
            "the quantised-coefficient option (coef_bits) has no counterpart in the released code",
        ),
        revision=2,
    )

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
        a0 = kaiming_uniform(params.rank, linear.in_features, seeded_generator(ctx.seed, "nola-a0:" + name))
        return NolaLayer(
            linear,
            bases,
            a0,
            params.alpha / params.rank,
            params.coef_bits,
            params.quant_aware,
        )

    def apply(self, model: nn.Module, params: NolaParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        model = super().apply(model, params, ctx, init_kwargs)
        layers = [m for m in adapter_layers(model).values() if isinstance(m, NolaLayer)]
        ctx.extras["nola_coef_storage_bytes"] = sum(m.coef_storage_bytes() for m in layers)
        return model

    def size_limit(self, shapes: list[tuple[int, int]], params: NolaParams) -> int:
        """Budget cap: r * d random bases span every r x d_in A (d_out x r B) of the widest target; more add
        nothing but memory (the bases hold k r d values per layer)."""
        return params.rank * max(max(shape) for shape in shapes)

    def layer_trainable(self, d_out: int, d_in: int, params: NolaParams) -> int:
        return params.num_basis_a + params.num_basis_b
