"""ALLoRA (Huang et al., 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv:2410.09692): LoRA without dropout and without the alpha/r scale, whose gradients are scaled
by a coefficient inversely proportional to the parameters' l2 norm, then AdamW.

Rule implemented (the abstract only says "∝ 1/‖θ‖"; the exact form is uncertain, METHODS.md §3.2):
for every row θ_i of each 2-D lora_A (r x d_in) / lora_B (d_out x r) tensor,
    g_i <- g_i / sqrt(‖θ_i‖² + 1/η²),
then AdamW on the scaled gradients. The 1/η² term bounds the coefficient by η, so the zero-init B
(and any row near 0) gets gradient multiplied by η and escapes 0 quickly, while rows that have grown
get a smaller effective step (≈ 1/‖θ_i‖). The coefficient depends only on θ, so scaling each
per-sample gradient equals scaling the batch gradient, which is what is done (inside
``optimizer.step()``, i.e. after the loop's gradient clipping). ``allora_norm: tensor`` uses the
whole tensor's norm instead of per-row norms (an ablation). Caveat: Adam is invariant to a
constant gradient scale per coordinate, so under AdamW the rule acts through how the coefficient
changes over time (and through eps); it is not a plain learning-rate multiplier.
Hyper-parameters: η (``allora_eta``, replaces alpha and dropout; default 1.0, not from the paper),
AdamW's betas (0.9, 0.999) and eps 1e-8. The adapter must run with dropout 0 and alpha = rank
(scale 1): the preset sets alpha to the rank and ``build`` refuses anything else. Other trainable
tensors (the task head) get plain AdamW.
"""

from __future__ import annotations

import math

import torch

from lorabench.errors import ConfigError
from lorabench.method_params.optimizers import ALLoRAParams
from lorabench.methods.base import MethodContext, OptimizerBuilder, decay_groups
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import OPTIMIZERS


@torch.no_grad()
def allora_coefficient(p: torch.Tensor, eta: float, norm: str = "row") -> torch.Tensor:
    """1 / sqrt(‖θ_i‖² + 1/η²) per row (shape rows x 1) or for the whole tensor (a scalar)."""
    t = p if p.dtype in (torch.float32, torch.float64) else p.float()
    sq = t.pow(2).sum(dim=1, keepdim=True) if norm == "row" else t.pow(2).sum()
    return (sq + 1.0 / eta**2).rsqrt()


class ALLoRAAdamW(torch.optim.AdamW):
    """torch AdamW whose ``allora`` groups have their gradients rescaled before the update."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group.get("allora"):
                continue
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(allora_coefficient(p, group["eta"], group["norm"]).to(p.grad.dtype))
        return super().step(closure)


@OPTIMIZERS.register("allora")
class ALLoRA(OptimizerBuilder):
    Params = ALLoRAParams
    paper = "Huang et al., 2024, arXiv:2410.09692"
    backed_by = "lorabench"
    fidelity = Fidelity(
        reference="none released: no code found for arXiv:2410.09692 (GitHub code, issues and pages searched for"
        " 'ALLoRA')",
        status="rule",
        tolerance="hand-computed AdamW loops, 1e-12 (tests/test_lowrank_optimizers.py)",
        unchecked=(
            "the coefficient's form 1/sqrt(||row||^2 + 1/eta^2), per row, and eta 1.0 are our reading of 'inversely"
            " proportional to the l2 norm' (METHODS.md); no code exists to check them against",
        ),
    )
    requires_adapter = ("lora",)

    def build(self, model, params: ALLoRAParams, ctx: MethodContext) -> torch.optim.Optimizer:
        config = model.peft_config["default"]
        scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        if config.lora_dropout != 0 or not math.isclose(scale, 1.0) or config.use_dora:
            raise ConfigError(
                f"optimizer allora needs LoRA without dropout and without scaling: got dropout={config.lora_dropout}, "
                f"alpha={config.lora_alpha}, rank={config.r} (scale {scale:g}), use_dora={config.use_dora}; "
                "set method.dropout=0 and method.alpha=method.rank"
            )
        lora = [p for n, p in model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)]
        if not lora:
            raise ConfigError("optimizer allora found no trainable lora_A/lora_B tensors")
        ids = {id(p) for p in lora}
        groups = [
            {
                "params": lora,
                "weight_decay": ctx.weight_decay,
                "allora": True,
                "eta": params.allora_eta,
                "norm": params.allora_norm,
            }
        ]
        groups += decay_groups(model, ctx.weight_decay, exclude=ids)
        return ALLoRAAdamW(groups, lr=ctx.lr, betas=(params.beta1, params.beta2), eps=params.eps)
