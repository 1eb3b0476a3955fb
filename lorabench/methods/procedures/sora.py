"""SoRA's proximal gate update (Ding et al., 2023, arXiv:2311.11696), run from the training loop.

After every optimizer step (which moved the gates g with the run's optimizer), ``on_step_end``
applies the soft-threshold of the L1 penalty to every SoRA gate:
g <- sign(g) * max(|g| - tau, 0), tau = lambda_t * eta, where eta = 1 (the authors' SparseAdamW) or
the learning rate of the gates' parameter group for the step just taken (``lambda_times_lr: true``,
proximal SGD as in the paper). lambda_t is ``sparse_lambda`` or, with ``lambda_schedule: linear``, a
staircase from ``sparse_lambda`` to ``max_lambda`` in ``lambda_num`` equal stages over
``train.max_steps`` (the authors step lambda per stage to trace sparsity vs. performance).
``state()`` reports the surviving (non-zero-gate) rank of every layer and the final lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.methods.adapters.sora import SoraLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import PROCEDURES


@dataclass
class SoraProximalParams:
    sparse_lambda: float = 3.0e-4
    lambda_times_lr: bool = False
    lambda_schedule: str = "none"  # "none" or "linear"
    max_lambda: float = 1.0e-3
    lambda_num: int = 5

    def __post_init__(self) -> None:
        check_positive("method.sparse_lambda", self.sparse_lambda, allow_zero=True)
        check_positive("method.lambda_num", self.lambda_num)
        if self.lambda_schedule not in ("none", "linear"):
            raise ConfigError(f"method.lambda_schedule={self.lambda_schedule!r} is invalid; use 'none' or 'linear'")


def soft_threshold_(g: torch.Tensor, tau: float) -> None:
    g.copy_(torch.sign(g) * torch.clamp(g.abs() - tau, min=0))


@PROCEDURES.register("sora")
class SoraProximal(Procedure):
    Params = SoraProximalParams
    paper = "Ding et al., 2023, arXiv:2311.11696"
    fidelity = Fidelity(
        reference="TsinghuaC3I/SoRA",
        status="unchecked",
        unchecked=(
            "no parity fixture produced by the authors' code yet",
            "the authors' trainer also adds an L1 term (lambda = 10) to the loss; ours applies only the proximal step",
        ),
    )
    requires_adapter = ("sora",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: SoraProximalParams, ctx: MethodContext
    ) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, SoraLayer)}
        if not self.layers:
            raise ValueError("the sora procedure found no SoRA layers")
        self.params, self.max_steps = params, max(ctx.max_steps, 1)
        self.optimizer = optimizer
        gate_ids = {id(m.gate) for m in self.layers.values()}
        self.group = next((g for g in optimizer.param_groups if any(id(p) in gate_ids for p in g["params"])), None)
        self.lr = self.group["lr"] if self.group else ctx.lr
        self.current_lambda = params.sparse_lambda

    def lambda_at(self, step: int) -> float:
        p = self.params
        if p.lambda_schedule == "none" or p.lambda_num == 1:
            return p.sparse_lambda
        stage = min(p.lambda_num - 1, step * p.lambda_num // self.max_steps)
        return p.sparse_lambda + (p.max_lambda - p.sparse_lambda) * stage / (p.lambda_num - 1)

    def threshold(self) -> float:
        return self.current_lambda * (self.lr if self.params.lambda_times_lr else 1.0)

    def after_backward(self, step: int) -> None:
        self.current_lambda = self.lambda_at(step)
        if self.group is not None:
            self.lr = self.group["lr"]  # the lr of the step about to be taken

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        tau = self.threshold()
        for layer in self.layers.values():
            if layer.gate is not None:
                soft_threshold_(layer.gate, tau)

    def state(self) -> dict:
        return {"sora_ranks": {name: m.rank() for name, m in self.layers.items()}, "sora_lambda": self.current_lambda}

    def state_dict(self) -> dict:
        return {"lambda": self.current_lambda, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.current_lambda, self.lr = float(state["lambda"]), float(state["lr"])
