"""IncreLoRA's incremental rank allocation (Zhang et al., 2023, arXiv:2308.12043), run from the loop.

``after_backward`` (gradients present): adds the orthogonality regulariser's gradient
gamma * 4 P_a (P_a^T P_a - I) and gamma * 4 (Q_a Q_a^T - I) Q_a on the active components, updates
AdaLoRA's importance EMAs (sensitivity I = |theta * grad|, I_bar = b1 I_bar + (1 - b1) I,
U_bar = b2 U_bar + (1 - b2) |I - I_bar|, score = I_bar * U_bar; a triplet's score is its lambda's
plus the means over its P column and Q row), and, every ``delta_t`` steps after ``tinit``, gives
one more component to each of the ``add_per_round`` modules with the highest mean triplet score
(among modules with room) until the total active rank reaches ``target_r`` x number of layers.
``state()`` reports the active rank per layer; ``state_dict()`` (checkpoints) holds the rank masks,
the importance EMAs and the addition count, so a resumed run allocates exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.methods.adapters.increlora import IncreLoraLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.registry import PROCEDURES


@dataclass
class IncreLoraAllocParams:
    target_r: int = 8  # average active rank per layer at the end
    tinit: int = 0  # steps before the first addition
    delta_t: int = 10  # steps between additions
    add_per_round: int = 1  # modules that get a new component per round
    ipt_beta1: float = 0.85
    ipt_beta2: float = 0.85
    orth_reg_weight: float = 0.1

    def __post_init__(self) -> None:
        for key in ("target_r", "delta_t", "add_per_round"):
            check_positive(f"method.{key}", getattr(self, key))
        check_positive("method.orth_reg_weight", self.orth_reg_weight, allow_zero=True)


@PROCEDURES.register("increlora")
class IncreLoraAllocator(Procedure):
    Params = IncreLoraAllocParams
    paper = "Zhang et al., 2023, arXiv:2308.12043"
    requires_adapter = ("increlora",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: IncreLoraAllocParams, ctx: MethodContext
    ) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, IncreLoraLayer)}
        if not self.layers:
            raise ValueError("the increlora procedure found no IncreLoRA layers")
        self.p = params
        self.budget = params.target_r * len(self.layers)
        self.ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.additions = 0

    @torch.no_grad()
    def _orth_grad(self, layer: IncreLoraLayer) -> None:
        active = layer.rank_mask.bool()
        if self.p.orth_reg_weight == 0 or not active.any():
            return
        gamma = self.p.orth_reg_weight
        if layer.lora_P.grad is not None:
            p = layer.lora_P[:, active]
            eye = torch.eye(p.shape[1], device=p.device, dtype=p.dtype)
            layer.lora_P.grad[:, active] += gamma * 4 * p @ (p.T @ p - eye)
        if layer.lora_Q.grad is not None:
            q = layer.lora_Q[active]
            eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
            layer.lora_Q.grad[active] += gamma * 4 * (q @ q.T - eye) @ q

    @torch.no_grad()
    def _score(self, param: nn.Parameter) -> torch.Tensor:
        if param.grad is None:
            return torch.zeros_like(param)
        sens = (param * param.grad).abs()
        i_bar, u_bar = self.ema.get(id(param), (torch.zeros_like(param), torch.zeros_like(param)))
        i_bar = self.p.ipt_beta1 * i_bar + (1 - self.p.ipt_beta1) * sens
        u_bar = self.p.ipt_beta2 * u_bar + (1 - self.p.ipt_beta2) * (sens - i_bar).abs()
        self.ema[id(param)] = (i_bar, u_bar)
        return i_bar * u_bar

    def module_scores(self) -> dict[str, float]:
        scores = {}
        for name, layer in self.layers.items():
            triplet = self._score(layer.lora_E) + self._score(layer.lora_P).mean(0) + self._score(layer.lora_Q).mean(1)
            active = layer.rank_mask.bool()
            scores[name] = float(triplet[active].mean()) if active.any() else 0.0
        return scores

    def after_backward(self, step: int) -> None:
        for layer in self.layers.values():
            self._orth_grad(layer)
        scores = self.module_scores()
        due = step > self.p.tinit and (step - self.p.tinit) % self.p.delta_t == 0
        total = sum(m.rank() for m in self.layers.values())
        if not due or total >= self.budget:
            return
        room = [n for n, m in self.layers.items() if m.rank() < m.rank_mask.numel()]
        for name in sorted(room, key=lambda n: -scores[n])[: min(self.p.add_per_round, self.budget - total)]:
            self.layers[name].grow()
            self.additions += 1

    def state(self) -> dict:
        return {"increlora_ranks": {n: m.rank() for n, m in self.layers.items()}, "increlora_additions": self.additions}

    def state_dict(self) -> dict:
        """The rank masks (buffers, not in the checkpoint's trainable tensors), the importance EMAs
        (as nested lists, about twice the adapter's size) and the number of additions."""
        params = {id(p): f"{n}.{k}" for n, m in self.layers.items() for k, p in m.named_parameters(recurse=False)}
        return {
            "masks": {n: m.rank_mask.tolist() for n, m in self.layers.items()},
            "additions": self.additions,
            "ema": {params[i]: [a.tolist(), b.tolist()] for i, (a, b) in self.ema.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, mask in state["masks"].items():
            self.layers[name].rank_mask.copy_(torch.tensor(mask))
        self.additions = int(state["additions"])
        params = {f"{n}.{k}": p for n, m in self.layers.items() for k, p in m.named_parameters(recurse=False)}
        self.ema = {
            id(params[key]): (
                torch.tensor(a, dtype=params[key].dtype, device=params[key].device),
                torch.tensor(b, dtype=params[key].dtype, device=params[key].device),
            )
            for key, (a, b) in state["ema"].items()
        }
