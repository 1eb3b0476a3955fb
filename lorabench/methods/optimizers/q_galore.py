"""Q-GaLore (Zhang et al., 2024, "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients", arXiv:2407.08296): GaLore with the projection stored in INT4, a lazy, layer-adaptive
subspace refresh and 8-bit Adam moments.

Update rule, per targeted 2-D weight W (m x n) with gradient G at the 0-based step t:

* side (galore-torch's ``std``, the only rule the authors implement): right if m >= n (B = the top-r
  right singular vectors, r x n, R = G Bᵀ), else left (A = the top-r left singular vectors, m x r,
  R = Aᵀ G). The basis is recomputed by SVD at t = 0 and at every t with t % T_W == 0.
* lazy refresh, per weight: after each SVD but the first, the signed cosine between the new and the
  previous leading singular vector (unquantized) joins a queue of the last ``queue_size`` (5) values;
  once the queue is full and its mean is >= ``cos_threshold`` (0.4), T_W = int(T_W · ``gamma_proj``)
  (2). The queue is never cleared, so a layer that stays stable doubles its gap at every SVD; the
  SVDs between are skipped by the ``t % T_W`` rule.
* INT4 projection: the basis in its stored layout (B: r x n; A: m x r, so a group mixes the r columns
  of A row by row) is cut into groups of ``proj_group_size`` (256) consecutive entries; per group
  s = max(max - min, 1e-5) / (2^b - 1), z = clamp(-round(min / s), 0, 2^b - 1) and
  q = clamp(round(x / s) + z, 0, 2^b - 1), round to nearest (no stochastic rounding); the projection
  uses s (q - z). b = ``proj_bits`` (4; 8, or 32 for an fp32 basis).
* moments (bitsandbytes' AdamW8bit, as the authors' QGaLoreAdamW8bit): Adam on R, and on the full
  gradient of every other parameter. A tensor with >= ``min_8bit_size`` (4096) entries keeps m and v
  in 8 bits, blockwise: blocks of 256 consecutive entries, one fp32 absmax per block, codes into
  bitsandbytes' dynamic map (signed for m, unsigned for v; ``dynamic_map``). Each step dequantizes,
  updates m = β1 m + (1-β1) R, v = β2 v + (1-β2) R² in fp32, takes the step with those values and
  requantizes: absmax = max |x| of the block, code = the map entry nearest to x / absmax (ties to the
  lower entry), and an m whose code has the other sign moves one entry towards its own sign (as the
  CUDA kernel does). Smaller tensors keep fp32 m and v. The step is
  ΔR = -lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps) (= bitsandbytes' -lr·sqrt(1-β2^t)/(1-β1^t) ·
  m / (sqrt(v) + eps·sqrt(1-β2^t))); the moments and their bias correction carry over refreshes.
* W += scale · back(ΔR) (back(X) = X B or A X, with the dequantized basis), then W -= lr·wd·W; other
  parameters W += ΔW, then the same decay.

Defaults: the authors' (run_pretrain.py, q_galore_adamw8bit.py): proj_bits 4, proj_group_size 256,
cos_threshold 0.4, queue_size 5, gamma_proj 2, min_8bit_size 4096, eps 1e-8, betas (0.9, 0.999) (the
optimizer's own; their pre-training script passes β2 = 0.95), scale 0.25 and update_proj_gap 200 (their
C4 scripts; run_pretrain's argparse defaults are 1.0 and 50); rank 8 (fine-tuning; their scripts use
128 and more).

Not supported (documented deviation): the INT8 weights with stochastic rounding (``--weight_quant
--stochastic_round``). lorabench keeps every method's weights in the training precision, so quantized
weights would confound the comparison and need a quantized Linear; only the optimizer side is here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorabench.method_params.optimizers import QGaLoreParams
from lorabench.methods.base import MethodContext, OptimizerBuilder, decay_groups, target_linear_weights
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.optimizers.galore_family import GaLoreFamily
from lorabench.methods.optimizers.projectors import PROJECTORS, SVDProjector
from lorabench.registry import OPTIMIZERS

REFERENCE = "pip q-galore-torch==1.0 (= VITA-Group/Q-GaLore@5bd2f1c5a1ae q_galore_torch/)"
STATE_BLOCK = 256  # entries per absmax block of the 8-bit moments (bitsandbytes' blockwise optimizers)
MOMENT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


# ----------------------------------------------------------------------------- 8-bit moments


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic data type (create_dynamic_map with 7 exponent bits): 256 sorted
    fp32 values. For each decade 10^(k-6), k = 0..6, the midpoints of ``count + 1`` evenly spaced
    points of [0.1, 1] scaled by 10^(k-6), with count = 2^k (signed: both signs) or 2^(k+1)
    (unsigned); plus 0 and 1. Signed: [-0.99297, 1]; unsigned: [0, 1]."""
    values = [0.0, 1.0]
    for k in range(7):
        count = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (k - 6)
        values += (decade * mids).tolist()
        if signed:
            values += (-decade * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, x's shape) and per-block absmax (fp32) of x in blocks of ``STATE_BLOCK``
    entries: the nearest entry of ``qmap`` to x / absmax (ties to the lower one); with ``signed``, a
    code whose sign differs from x's moves one entry towards x's sign."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % STATE_BLOCK
    blocks = F.pad(flat, (0, pad)).view(-1, STATE_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)).reshape(-1)
    normed = normed[: flat.numel()]
    upper = torch.searchsorted(qmap, normed, out_int32=True).clamp_(max=qmap.numel() - 1)
    lower = (upper - 1).clamp_(min=0)
    take_lower = (normed - qmap[lower]).abs() <= (qmap[upper] - normed).abs()
    codes = torch.where(take_lower, lower, upper)
    if signed:
        flipped = torch.signbit(qmap[codes]) != torch.signbit(normed)
        codes = codes + flipped.to(codes.dtype) * torch.where(normed > 0, 1, -1).to(codes.dtype)
    return codes.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    scale = absmax.repeat_interleave(STATE_BLOCK)[: codes.numel()]
    return (qmap[codes.reshape(-1).long()] * scale).view(codes.shape)


# ----------------------------------------------------------------------------- INT4 projection


def quantize_groups(x: torch.Tensor, bits: int, group_size: int):
    """Asymmetric min/max quantization of x's entries (row-major) in groups of ``group_size``
    (<= 0: one group per row; a shorter last group where the count does not divide). Returns
    (codes, scales (G x 1, fp32), zeros (G x 1, uint8)); 4-bit codes are packed two per byte."""
    flat = x.reshape(-1)
    size = group_size if group_size > 0 else x.shape[-1]
    pad = (-flat.numel()) % size
    if pad:  # repeat the last entry: the last group's min and max stay its own
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    groups = flat.view(-1, size)
    qmax = 2**bits - 1
    scales = (groups.amax(dim=1, keepdim=True) - groups.amin(dim=1, keepdim=True)).clamp(min=1e-5) / qmax
    zeros = (-torch.round(groups.amin(dim=1, keepdim=True) / scales)).clamp_(0, qmax)
    q = torch.clamp(torch.round(groups / scales) + zeros, 0, qmax).to(torch.uint8).reshape(-1)[: x.numel()]
    if bits == 4:
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        q = q[0::2] | (q[1::2] << 4)
    return q, scales, zeros.to(torch.uint8)


def dequantize_groups(codes, scales, zeros, bits: int, group_size: int, shape) -> torch.Tensor:
    """s (q - z) per group, in ``shape`` (the inverse of ``quantize_groups``)."""
    numel = shape[0] * shape[1]
    q = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1) if bits == 4 else codes
    size = group_size if group_size > 0 else shape[1]
    q = torch.cat([q[:numel], q.new_zeros(scales.shape[0] * size - numel)]).view(-1, size)
    return (scales * (q.to(scales.dtype) - zeros.to(scales.dtype))).reshape(-1)[:numel].view(shape)


class QGaLoreProjector(SVDProjector):
    """GaLore's SVD projector (``std`` side) with Q-GaLore's storage (``bits`` 4 or 8 in groups of
    ``group_size``; 32 keeps fp32) and its lazy refresh (``cos_threshold``, ``queue_size``,
    ``gamma_proj``; see the module docstring). ``refreshes`` counts the SVDs actually run."""

    def __init__(
        self,
        shape,
        rank: int,
        gap: int,
        *,
        bits: int = 4,
        group_size: int = 256,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        gamma_proj: int = 2,
        **kw,
    ):
        super().__init__(shape, rank, gap, **{**kw, "proj_type": "std"})
        self.bits, self.group_size = bits, group_size
        self.cos_threshold, self.queue_size, self.gamma_proj = cos_threshold, queue_size, gamma_proj
        self.queue: list[float] = []  # signed cosines of successive leading singular vectors
        self.leading = None  # the previous leading singular vector, before quantization
        self.codes = self.scales = self.zeros = None

    @property
    def ready(self) -> bool:
        return self.basis_fp32 is not None or self.codes is not None

    @property
    def layout(self) -> tuple[int, int]:
        """The shape the basis is quantized in: B (r x n) on the right, A = Bᵀ (m x r) on the left."""
        return (self.rank, self.dim) if self.side == "right" else (self.dim, self.rank)

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        basis = self._compute(grad.float(), step)
        leading = basis[0].clone()
        if self.leading is not None:
            if len(self.queue) == self.queue_size:
                self.queue.pop(0)
            self.queue.append(F.cosine_similarity(self.leading, leading, dim=0).item())
            if len(self.queue) == self.queue_size and sum(self.queue) / self.queue_size >= self.cos_threshold:
                self.gap = int(self.gap * self.gamma_proj)
        self.leading = leading
        self._store(basis)
        self.refreshes += 1
        return True

    def _store(self, basis: torch.Tensor) -> None:
        if self.bits == 32:
            return super()._store(basis)
        stored = basis if self.side == "right" else basis.T
        self.codes, self.scales, self.zeros = quantize_groups(stored.contiguous(), self.bits, self.group_size)

    def basis(self) -> torch.Tensor:
        if self.bits == 32:
            return self.basis_fp32
        stored = dequantize_groups(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.layout)
        return stored if self.side == "right" else stored.T

    def state_tensors(self) -> list[torch.Tensor]:
        kept = (self.basis_fp32, self.codes, self.scales, self.zeros, self.leading)
        return [t for t in kept if t is not None]


PROJECTORS["q_galore"] = QGaLoreProjector  # checkpoints name their projector class; see Projector.from_state


# ----------------------------------------------------------------------------- the optimizer


class QGaLoreAdamW(GaLoreFamily):
    """The GaLore-family optimizer with Q-GaLore's projector and bitsandbytes' AdamW8bit rules: 8-bit
    blockwise moments for tensors of >= ``min_8bit_size`` entries (fp32 below), eps after the bias
    correction, decoupled decay after the update. Projected groups carry proj_bits,
    proj_group_size, cos_threshold, queue_size and gamma_proj."""

    rule_defaults = {"eps_after_correction": True, "decay_first": False}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.min_8bit_size = min_8bit_size
        self.qmaps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (signed, unsigned) map

    def _projector(self, p, group, index):
        return QGaLoreProjector(
            p.shape,
            group["rank"],
            group["update_proj_gap"],
            bits=group["proj_bits"],
            group_size=group["proj_group_size"],
            cos_threshold=group["cos_threshold"],
            queue_size=group["queue_size"],
            gamma_proj=group["gamma_proj"],
        )

    def maps(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self.qmaps:
            self.qmaps[key] = (dynamic_map(True).to(device), dynamic_map(False).to(device))
        return self.qmaps[key]

    def extra_state_tensors(self):
        """The two dynamic maps, shared by every 8-bit moment of an optimizer (counted once)."""
        return [t for pair in self.qmaps.values() for t in pair]

    def _adam_direction(self, state: dict, low: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        low = low.float()
        if low.numel() < self.min_8bit_size:
            return super()._adam_direction(state, low, group)
        signed, unsigned = self.maps(low.device)
        if "exp_avg_q" not in state:
            blocks = math.ceil(low.numel() / STATE_BLOCK)
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                state[key] = torch.zeros(low.shape, dtype=torch.uint8, device=low.device)
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                state[key] = torch.zeros(blocks, dtype=torch.float32, device=low.device)
            state["adam_step"] = 0
        exp_avg = dequantize_blockwise(state["exp_avg_q"], state["exp_avg_absmax"], signed)
        exp_avg_sq = dequantize_blockwise(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], unsigned)
        state["adam_step"] += 1
        t = state["adam_step"]
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        correction1, correction2 = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
        normed = exp_avg / exp_avg_sq.sqrt().div_(correction2).add_(group["eps"])
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize_blockwise(exp_avg, signed, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_blockwise(exp_avg_sq, unsigned, signed=False)
        return normed, group["lr"] / correction1

    def _reset_moments(self, state: dict) -> None:
        super()._reset_moments(state)
        if "exp_avg_q" in state:
            for key in MOMENT_KEYS:
                state[key].zero_()
            state["adam_step"] = 0

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every state tensor to its parameter's dtype; the 8-bit codes go back to uint8,
        absmax values and fp32 moments back to fp32."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                if key in state:
                    state[key] = state[key].to(torch.uint8)
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax", "exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].float()


# ----------------------------------------------------------------------------- the builder


@OPTIMIZERS.register("q_galore")
class QGaLore(OptimizerBuilder):
    """Targeted 2-D weights in one Q-GaLore group (as galore_torch.py selects them); every other
    trainable parameter in plain groups of the same optimizer (no decay on 1-D tensors), which gives
    them the same 8-bit AdamW, as the authors' single QGaLoreAdamW8bit does."""

    Params = QGaLoreParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Zhang et al., 2024, arXiv:2407.08296"
    backed_by = "lorabench"
    fidelity = Fidelity(
        reference=REFERENCE + " q_galore_projector.py + q_galore_adamw8bit.py, on bitsandbytes==0.50.2",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12-24 steps (fp32, CPU); INT4 codes, map, 8-bit codes, gaps, SVD counts exact",
        fixture="tests/fixtures/parity/q_galore.json",
        deviations=(
            "INT8 weights with stochastic rounding are not implemented: lorabench keeps every method's weights in"
            " the training precision (only the optimizer side: INT4 projection, lazy refresh, 8-bit moments)",
            "a basis whose entry count is not a multiple of proj_group_size gets a shorter last group (the"
            " reference asserts divisibility and stops)",
            "INT4 codes are packed two per byte and zero points kept in uint8 (the reference keeps one code per"
            " uint8 and fp32 zero points): the same values, the paper's INT4 memory",
        ),
        unchecked=(
            "bitsandbytes' CUDA kernels, which the authors ran: the parity drives bnb's pure-PyTorch port of the"
            " blockwise 8-bit Adam update (nearest map entry) and its CPU 32-bit kernel. The CUDA kernel's midpoint"
            " search and __fdividef normalisation (near-tie codes), its sign-preserving nudge of m, which the port"
            " lacks (ours does it: the blockwise test allows exactly those codes; no optimizer case reaches it), and"
            " its decay-after-update for non-projected parameters (ours too; the CPU kernels decay first, so the"
            " parity cases give non-projected parameters no decay) are not compared",
            "bitsandbytes' C++ CPU 8-bit kernel is not the reference: its table search picks a non-nearest code"
            " for some entries (most of them small v values)",
            "the reference optimizer runs through shims: bnb 0.50.2's constructor arguments by keyword and its"
            " update_step dispatch (the authors' code targets bnb 0.43.1's signatures), torch.cuda.synchronize"
            " stubbed on CPU",
            "the INT8-weight path (float_grad, weight (de)quantization, the all_gather of float gradients) and the"
            " simulate variant: not implemented here",
        ),
    )

    def build(self, model, params: QGaLoreParams, ctx: MethodContext) -> QGaLoreAdamW:
        projected = [p for _, p in target_linear_weights(model, ctx.target_modules) if p.requires_grad]
        groups = decay_groups(model, ctx.weight_decay, exclude={id(p) for p in projected})
        if projected:
            groups.append(
                {
                    "params": projected,
                    "weight_decay": ctx.weight_decay,
                    "projector": "q_galore",
                    "rank": params.rank,
                    "update_proj_gap": params.update_proj_gap,
                    "scale": params.scale,
                    "proj_bits": params.proj_bits,
                    "proj_group_size": params.proj_group_size,
                    "cos_threshold": params.cos_threshold,
                    "queue_size": params.queue_size,
                    "gamma_proj": params.gamma_proj,
                    "seed": ctx.seed,
                }
            )
        return QGaLoreAdamW(
            groups,
            lr=ctx.lr,
            betas=(params.beta1, params.beta2),
            eps=params.eps,
            min_8bit_size=params.min_8bit_size,
        )
