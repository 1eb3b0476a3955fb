"""LoRA-MGPO, the second version of LoRA-GGPO (Chang et al., 2025, arXiv:2502.14538): a weight
perturbation in the direction of the optimizer's momentum, sized by a running average of the
gradient-update norm, without SAM's second backward pass; as the authors' trainer does it
(llm172/LoRA-MGPO, formerly llm172/LoRA-GGPO, ``lora_mgpo/trainer.py``).

For every LoRA layer (frozen W0, factors B (d_out x r) and A (r x d_in), scaling s = alpha / r), with
m_A, m_B the optimizer's first moments (AdamW's ``exp_avg``) of A and B:

    V = s (m_B A + B m_A)                      the momentum of the update s B A
    c = min(1 / (gbar + eps), max_scale)       (c = 1 before the first average, or unnormalised)
    eps_W = -rho c V / (||V||_F + eps)
    forward and backward at W0 + eps_W; then W0 is restored, and
    G = s (g_B A + B g_A),   gbar <- ||G||_F (first time) or beta gbar + (1 - beta) ||G||_F

per layer, before the optimizer step. A layer without momentum yet (the first step), with a
non-finite V or with ||V|| <= eps is not perturbed. The perturbation points along minus the momentum,
as the reference computes it.

Deviations: W0 is restored from a copy taken before the perturbation (exact; the reference subtracts
the recomputed perturbation, off by float rounding, e.g. 3.7e-9, every step). With gradient
accumulation the reference perturbs and updates gbar per micro-batch, with the accumulated gradient;
here the perturbation spans the optimizer step and gbar is updated once per step. The copy costs one
set of the targeted base weights in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.regularizers import MgpoParams
from lorabench.methods.base import MethodContext, Regularizer
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import REGULARIZERS

REFERENCE = "llm172/LoRA-MGPO@b45656c240fc"


def momentum_direction(a, b, m_a, m_b, scaling: float) -> torch.Tensor:
    """V = s (m_B A + B m_A), in fp32."""
    a, b, m_a, m_b = (t.float() for t in (a, b, m_a, m_b))
    return scaling * (m_b @ a + b @ m_a)


def perturbation(direction: torch.Tensor, gbar: float | None, params: MgpoParams) -> torch.Tensor | None:
    """eps_W = -rho c V / (||V|| + eps), or None where the reference leaves the layer alone."""
    norm = direction.norm()
    if not torch.isfinite(direction).all() or norm <= params.mgpo_eps:
        return None
    scale = 1.0
    if params.mgpo_normalize and gbar is not None:
        scale = min(1.0 / (gbar + params.mgpo_eps), params.mgpo_max_scale)
    return -params.mgpo_rho * scale * direction / (norm + params.mgpo_eps)


def update_norm(a, b, g_a, g_b, scaling: float) -> float:
    """||s (g_B A + B g_A)||_F."""
    return momentum_direction(a, b, g_a, g_b, scaling).norm().item()


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers with an active ``default``-style adapter, by module name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.active_adapters}


def _factors(layer) -> tuple[nn.Parameter, nn.Parameter, float]:
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


@REGULARIZERS.register("mgpo")
class Mgpo(Regularizer):
    Params = MgpoParams
    paper = "arXiv:2502.14538"
    backed_by = "lorabench"
    requires_adapter = ("lora",)
    fidelity = Fidelity(
        reference=f"{REFERENCE} lora_mgpo/trainer.py (apply/remove perturbation, gradient-norm EMA)",
        status="parity",
        tolerance="perturbation and gbar <= 1e-6 relative over 2 steps, 3 settings",
        fixture="tests/fixtures/parity/mgpo.json",
        deviations=(
            "W0 restored exactly from a copy (the reference subtracts the recomputed perturbation)",
            "with gradient accumulation: one perturbation and one gbar update per optimizer step "
            "(the reference: per micro-batch)",
        ),
        unchecked=("GGPO v1 (the paper's first version): no released code of it was found",),
    )

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: MgpoParams, ctx: MethodContext):
        self.params, self.optimizer = params, optimizer
        self.layers = lora_layers(model)
        self.gbar: dict[str, float] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self.perturbed_steps = 0

    def _momentum(self, p: nn.Parameter) -> torch.Tensor | None:
        state = self.optimizer.state.get(p, {})
        return state.get("exp_avg", state.get("momentum_buffer"))

    @torch.no_grad()
    def before_forward(self, model: nn.Module, step: int, pass_index: int = 0) -> None:
        for name, layer in self.layers.items():
            a, b, scaling = _factors(layer)
            m_a, m_b = self._momentum(a), self._momentum(b)
            if m_a is None or m_b is None:
                continue
            eps = perturbation(momentum_direction(a, b, m_a, m_b, scaling), self.gbar.get(name), self.params)
            if eps is None:
                continue
            weight = layer.get_base_layer().weight
            self._saved[name] = weight.detach().clone()
            weight.add_(eps.to(weight.dtype))
        self.perturbed_steps += bool(self._saved)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int, pass_index: int = 0) -> None:
        for name, original in self._saved.items():
            self.layers[name].get_base_layer().weight.copy_(original)
        self._saved.clear()
        beta = self.params.mgpo_beta
        for name, layer in self.layers.items():
            a, b, scaling = _factors(layer)
            if a.grad is None or b.grad is None:
                continue
            norm = update_norm(a, b, a.grad, b.grad, scaling)
            self.gbar[name] = norm if name not in self.gbar else beta * self.gbar[name] + (1 - beta) * norm

    def state(self) -> dict:
        values = list(self.gbar.values())
        return {
            "perturbed_steps": self.perturbed_steps,
            "mean_gradient_update_norm": sum(values) / len(values) if values else None,
        }

    def state_dict(self) -> dict:
        return {"gbar": dict(self.gbar), "perturbed_steps": self.perturbed_steps}

    def load_state_dict(self, state: dict) -> None:
        self.gbar, self.perturbed_steps = dict(state["gbar"]), int(state["perturbed_steps"])
