"""LoRA-SB, "LoRA Silver Bullet" (Ponkshe et al., 2024, "Initialization Using Update Approximation
is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv:2411.19557), our own layer.

Architecture: LoRA-XS (lora_xs.py), Delta W = s B (R - R0) A with B (d_out x r), A (r x d_in)
frozen and only R (r x r) trainable; trainable parameters per target: r^2, plus the task head.

Init (exactly what runs here):
1. G = the mean over ``ctx.calibration_batches()`` (``train.init_batches`` of them) of dL/dW0 for
   every target weight, on the unwrapped model in eval mode (no dropout), only target weights
   requiring grad.
2. The first full fine-tuning update is estimated as U1 = -lr * sign(G) (``grad_estimate: sign``,
   Adam's first step, as the authors' ``estimate_and_process_grads_torch`` does) or U1 = -lr * G
   (``grad_estimate: gradient``, SGD's first step).
3. Truncated SVD U1 ~ U_r S_r V_r^T; B = U_r, A = V_r^T, R0 = S_r / s (diagonal), so s B R0 A is the
   best rank-r approximation of U1. B, A and R0 are saved with the adapter (they need the data).
4. Residual handling (METHODS.md marks it uncertain): by default (``apply_first_update: false``)
   R0 is subtracted, so the model is unchanged at step 0 and only the subspace (B, A) comes from the
   gradient; with ``apply_first_update: true`` the model starts at W0 + s B R0 A, i.e. with the
   approximated first update already applied.
Hyper-parameters: rank r, alpha (s = alpha / r), grad_estimate, apply_first_update; the authors
use ~50 gradient samples (here: ``train.init_batches`` x micro-batch examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.methods.adapters.layer import OwnAdapter, check_rank, is_conv1d, target_shapes, top_svd
from lorabench.methods.adapters.lora_xs import XsLayer
from lorabench.methods.base import MethodContext
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


@dataclass
class LoraSbParams:
    rank: int = 8
    alpha: float = 16.0
    grad_estimate: str = "sign"  # "sign": -lr sign(G) (Adam's first step); "gradient": -lr G
    apply_first_update: bool = False

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        if self.grad_estimate not in ("sign", "gradient"):
            raise ConfigError(f"method.grad_estimate={self.grad_estimate!r} is invalid; use 'sign' or 'gradient'")


@ADAPTERS.register("lora_sb")
class LoraSbAdapter(OwnAdapter):
    Params = LoraSbParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target
    paper = "Ponkshe et al., 2024, arXiv:2411.19557"

    def prepare(self, model: nn.Module, params: LoraSbParams, ctx: MethodContext) -> None:
        self._grads, n = estimate_gradients(model, ctx.target_modules, ctx)
        if n == 0:
            raise ValueError("LoRA-SB needs calibration batches (train.init_batches > 0)")
        ctx.extras["lora_sb_batches"] = n

    def make_layer(self, name: str, linear: nn.Linear, params: LoraSbParams, ctx: MethodContext) -> XsLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        g = self._grads.pop(name)
        update = -ctx.lr * (torch.sign(g) if params.grad_estimate == "sign" else g)
        u, s, vh = top_svd(update, params.rank)
        scale = params.alpha / params.rank
        r0 = torch.diag(s / scale)
        return XsLayer(linear, u, vh, r0, scale, r0=None if params.apply_first_update else r0, persistent_factors=True)

    def layer_trainable(self, d_out: int, d_in: int, params: LoraSbParams) -> int:
        return params.rank * params.rank
