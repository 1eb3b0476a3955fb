"""GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection") through the authors' ``galore-torch`` package.

Update rule, per targeted 2-D weight W (m x n): every T steps P = top-r singular vectors of the
current gradient G (left if m < n, else right); R = P^T G (or G P^T); Adam moments live on R only;
W -= lr * scale * P Adam(R) (projected back). Every other trainable parameter uses plain AdamW.
Hyper-parameters (GLUE README): rank 4 or 8, update_proj_gap 500 (pre-training: 200),
scale 4 on GLUE (pre-training: 0.25), proj_type std.
"""

from __future__ import annotations

import torch

from lorabench.method_params.optimizers import GaLoreTorchParams as GaLoreParams
from lorabench.methods.base import MethodContext, OptimizerBuilder, decay_groups, target_linear_weights
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import OPTIMIZERS


def galore_param_groups(model, params: GaLoreParams, ctx: MethodContext) -> list[dict]:
    """Targeted 2-D weights in one GaLore group; the rest in ordinary AdamW groups."""
    projected = [p for _, p in target_linear_weights(model, ctx.target_modules) if p.requires_grad]
    groups = decay_groups(model, ctx.weight_decay, exclude={id(p) for p in projected})
    groups.append(
        {
            "params": projected,
            "weight_decay": ctx.weight_decay,
            "rank": params.rank,
            "update_proj_gap": params.update_proj_gap,
            "scale": params.scale,
            "proj_type": params.proj_type,
        }
    )
    return groups


@OPTIMIZERS.register("galore_torch")
class GaLoreTorch(OptimizerBuilder):
    Params = GaLoreParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    paper = "Zhao et al., 2024, arXiv:2403.03507"
    backed_by = "galore-torch"
    fidelity = Fidelity(
        reference="pip galore-torch==1.0 (GaLoreAdamW)",
        status="library",
        tolerance="reproduces tests/fixtures/parity/galore.json exactly (max |Δθ| = 0 over 12 steps)",
        fixture="tests/fixtures/parity/galore.json",
        unchecked=("betas and eps stay at GaLoreAdamW's defaults (0.9, 0.999), 1e-6: the builder passes none",),
    )

    def build(self, model, params: GaLoreParams, ctx: MethodContext) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        return checkpointable(GaLoreAdamW)(
            galore_param_groups(model, params, ctx), lr=ctx.lr, no_deprecation_warning=True
        )


def checkpointable(galore_adamw: type) -> type:
    """``GaLoreAdamW`` whose state dict holds each ``GaLoreProjector`` as its basis alone
    (``{"ortho_matrix": tensor}``), so that checkpoints load with ``torch.load(weights_only=True)``;
    loading rebuilds the projector from its parameter group's rank, gap, scale and proj_type (the
    values the package builds it from). The update rule is the package's, untouched."""
    from galore_torch.galore_projector import GaLoreProjector

    def encode(state: dict) -> dict:
        projector = state.get("projector")
        if not isinstance(projector, GaLoreProjector):
            return state
        return {**state, "projector": {"ortho_matrix": projector.ortho_matrix}}

    class CheckpointableGaLoreAdamW(galore_adamw):
        def state_dict(self) -> dict:
            packed = super().state_dict()  # per-parameter dicts are the live ones: copy, never mutate
            return {**packed, "state": {key: encode(value) for key, value in packed["state"].items()}}

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for p in group["params"]:
                    saved = self.state.get(p, {}).get("projector")
                    if isinstance(saved, dict):
                        projector = GaLoreProjector(
                            group["rank"],
                            update_proj_gap=group["update_proj_gap"],
                            scale=group["scale"],
                            proj_type=group["proj_type"],
                        )
                        projector.ortho_matrix = saved["ortho_matrix"]
                        self.state[p]["projector"] = projector

    return CheckpointableGaLoreAdamW
