"""LoRA-SB, "LoRA Silver Bullet" (Ponkshe et al., 2024, "Initialization Using Update Approximation
is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv:2411.19557), our own layer.
Authors' code: RaghavSinghal10/lora-sb.

Architecture: LoRA-XS (lora_xs.py), Delta W = s B R A with B (d_out x r), A (r x d_in) frozen and only
R (r x r) trainable; trainable parameters per target: r^2, plus the task head.

Init (what runs here, the authors' ``estimate_and_process_grads_torch`` + ``find_and_initialize_grad``):
1. G = the mean over ``ctx.calibration_batches()`` (``train.init_batches`` of them) of dL/dW0 for
   every target weight, on the unwrapped model in eval mode (no dropout), only target weights
   requiring grad.
2. The first full fine-tuning step is estimated as U1 = -lr_1 sign(G) (``grad_estimate: sign``, Adam's
   first step, the authors' code) or U1 = -lr_1 G (``grad_estimate: gradient``, SGD's first step),
   with lr_1 = lr / (warmup_ratio * max_steps): the learning rate of the linear warmup's first
   (non-zero) step, as the authors' scripts compute it (``warmup_ratio: 0`` takes the peak lr).
3. Truncated SVD U1 ~ U_r S_r V_r^T; B = U_r, A = V_r^T, R = diag(S_r) / s, so that s B R A is the best
   rank-r approximation of U1. With ``apply_first_update: true`` (the authors' code) W0 is left as it
   is and the model starts at W0 + U1_r, the approximated first update already applied; with false R's
   initial value R0 is subtracted (Delta W = s B (R - R0) A, unchanged model at step 0). B, A (and R0)
   are saved with the adapter (they need the data).
Hyper-parameters: rank r (the authors' GLUE scripts: 24; 96 for arithmetic / commonsense), scale s
(1: their scripts set lora_alpha = r), grad_estimate, warmup_ratio, apply_first_update, svd. The
authors estimate from 2 (GLUE), 50 or 170 samples (here: ``train.init_batches`` x micro-batch).
Kept deviations, at the defaults: the estimate runs in eval mode (deterministic and the same for
every seed; the authors' model is in train mode, dropout on); ``svd: exact`` (torch.linalg.svd in
float32) where the authors take ``torch.svd_lowrank(q=r, niter=10)`` after ``torch.manual_seed(42)``
and round U, S, V to bfloat16; ``svd: lowrank`` reproduces that path (on CPU) exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.adapters import LoraSbParams
from lorabench.methods.adapters.layer import OwnAdapter, check_rank, is_conv1d, target_shapes, top_svd
from lorabench.methods.adapters.lora_xs import XsLayer
from lorabench.methods.base import MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


def estimate_gradients(model: nn.Module, targets: list[str], ctx: MethodContext) -> tuple[dict[str, torch.Tensor], int]:
    """Mean dL/dW (d_out x d_in) over the calibration batches for the target linear layers, by module name."""
    names = {name for name, _, _ in target_shapes(model, targets)}
    modules = {name: m for name, m in model.named_modules() if name in names}
    weights = {name: m.weight for name, m in modules.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    device = next(iter(weights.values())).device
    model.eval()
    n = 0
    try:
        for batch in ctx.calibration_batches():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            model(**batch).loss.backward()
            n += 1
        grads = {}
        for name, w in weights.items():
            g = w.grad.float() / max(n, 1) if w.grad is not None else torch.zeros_like(w, dtype=torch.float32)
            grads[name] = g.T if is_conv1d(modules[name]) else g  # as (d_out, d_in)
    finally:
        for w in weights.values():
            w.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return grads, n


def lowrank_svd(update: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' factorisation of U1 (d_out x d_in), reproduced: ``torch.svd_lowrank`` of U1^T with
    q = r, 10 power iterations, torch's generator seeded with 42 (and one unused r-column draw before
    it, as theirs), U, S, V rounded to bfloat16; returned as (B = V, S, A = U^T) in float32. The global
    generator is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        torch.randn(update.shape[0], r)  # the authors' unused draw, which shifts the generator
        u, s, v = torch.svd_lowrank(update.T.float(), q=r, niter=10)
    bf16 = (t.to(torch.bfloat16).float() for t in (u, s, v))
    u, s, v = bf16
    return v, s, u.T


def first_step_lr(params: LoraSbParams, ctx: MethodContext) -> float:
    """The learning rate of the estimated first step: lr / (warmup_ratio * max_steps), or lr."""
    if params.warmup_ratio and ctx.max_steps:
        return ctx.lr / (params.warmup_ratio * ctx.max_steps)
    return ctx.lr


@ADAPTERS.register("lora_sb")
class LoraSbAdapter(OwnAdapter):
    Params = LoraSbParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Ponkshe et al., 2024, arXiv:2411.19557"
    fidelity = Fidelity(
        reference="RaghavSinghal10/lora-sb@37b33d4c4c57 (utils/gradient_utils.py estimate_and_process_grads_torch,"
        " utils/initialization_utils.py find_and_initialize_grad, utils/latent_utils.py forward_latent) on peft 0.13.2",
        status="parity",
        tolerance="svd lowrank: B, A, R as the reference's (<= 1e-7); training from the reference's init: max |Δ| /"
        " max(1, |ref|) <= 1e-6 of outputs, gradients, R over 12 steps (fp32, CPU); svd exact: s B R A within 3e-2"
        " (relative Frobenius) of the reference's, the gap of its randomized, bfloat16 factors",
        fixture="tests/fixtures/parity/lora_sb.json",
        deviations=(
            "svd exact (torch.linalg.svd, float32 factors) by default: the authors' torch.svd_lowrank(q=r,"
            " niter=10) with bfloat16-rounded U, S, V approximates the truncated SVD the paper states; svd: lowrank"
            " reproduces it",
            "the gradient is estimated in eval mode (no dropout; deterministic, the same for every seed); the authors'"
            " model is in train mode",
            "G is the mean of the batches' gradients of their mean losses; the authors sum the gradients of each"
            " batch's mean loss divided by its size (the same sign, and the same direction for equal batch sizes)",
        ),
        unchecked=(
            "the authors' CUDA path (svd_lowrank's random draw on the GPU generator) is not reproduced; svd: lowrank"
            " follows their CPU run",
        ),
        revision=2,
    )

    def prepare(self, model: nn.Module, params: LoraSbParams, ctx: MethodContext) -> None:
        self._grads, n = estimate_gradients(model, ctx.target_modules, ctx)
        if n == 0:
            raise ValueError("LoRA-SB needs calibration batches (train.init_batches > 0)")
        ctx.extras["lora_sb_batches"] = n
        ctx.extras["lora_sb_first_step_lr"] = first_step_lr(params, ctx)

    def make_layer(self, name: str, linear: nn.Linear, params: LoraSbParams, ctx: MethodContext) -> XsLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        g = self._grads.pop(name)
        update = -first_step_lr(params, ctx) * (torch.sign(g) if params.grad_estimate == "sign" else g)
        b, s, a = top_svd(update, params.rank) if params.svd == "exact" else lowrank_svd(update, params.rank)
        r0 = torch.diag(s / params.scale)
        return XsLayer(
            linear, b, a, r0, params.scale, r0=None if params.apply_first_update else r0, persistent_factors=True
        )

    def layer_trainable(self, d_out: int, d_in: int, params: LoraSbParams) -> int:
        return params.rank * params.rank
