"""IncreLoRA's incremental rank allocation (Zhang et al., 2023, arXiv:2308.12043), run from the loop.

``after_backward`` (gradients present): adds the orthogonality regulariser's gradient
gamma * 4 P_a (P_a^T P_a - I) and gamma * 4 (Q_a Q_a^T - I) Q_a on the active and reserved components,
updates AdaLoRA's importance EMAs (sensitivity I = |theta * grad|, I_bar = b1 I_bar + (1 - b1) I,
U_bar = b2 U_bar + (1 - b2) |I - I_bar|, score = I_bar * U_bar; a triplet's score is its lambda's
plus the means over its P column and Q row), and, every ``delta_t`` steps after ``tinit``, gives
one more component to each of the ``add_per_round`` modules with the highest mean triplet score
(among modules with room) until the total active rank reaches ``target_r`` x number of layers
(reserved components are not active and never count towards, nor exceed, that budget).

Advance learning and the warm-up of new components follow the authors' code, FeiyuZhang98/IncreLoRA:
loralib/loralib/increlora.py (``SVDLinear.add_reserve_param``, ``RankAllocator.update_and_increase``,
``RankAllocator.increase_to_target_rank``), NLU/src/transformers/optimization.py (``Multi_LambdaLR``,
``get_lr_lambda``), NLU/src/transformers/trainer.py (allocation after clipping, before
``optimizer.step()``; ``lr_scheduler.step()`` after it) and NLU/examples/text-classification/run_glue.py
(``advance_learn`` and ``multi_lr`` both default to True; every script in the repository sets both).

* ``advance_learn`` (default True). At step 0 every layer with room (while the budget is not spent)
  reserves one component: its gate lambda is set to ``reserve_gate`` = 1e-5 and frozen (no gradient),
  its P column and Q row (N(0, 0.02^2), as the authors' fresh reserve) train through that small gate.
  When the layer is chosen for growth, the reserve becomes active with its advance-learned P, Q and
  lambda = 1e-5 (now trainable), and the next inactive component is reserved in the same way. When
  the total active rank reaches the budget every reserve is released: its lambda is set to 0 and it
  plays no further part. With ``advance_learn=False`` there is no reserve: a new component starts
  from its init with lambda = 0 (as the authors' non-advance mode) and P, Q, lambda only train once
  active.
* ``warmup_new`` (default True; the authors' ``multi_lr``). The authors put every batch of new
  tensors in a new optimizer param group whose learning rate restarts the run's linear schedule:
  a group added during step t_g (before that step's ``optimizer.step()``) gets no update at step
  t_g and, at step s > t_g, the learning rate base_lr * L(s - t_g - 1) with
  L(j) = j / W for j < W, else max(0, (H - j) / (H - W)), W the warm-up length and
  H = T - t_g - 1 (T = train.max_steps), so it warms up again from 0 and reaches 0 at step T like
  the rest. Groups: the reserve's P column and Q row from the step it is reserved (step 0 for the
  first reserve), the activated component's lambda from the step it is activated (without advance
  learning: P, Q and lambda from the activation step); the ``init_r`` initial components follow the
  run's own schedule. Components that are neither active nor reserved do not move (the authors'
  components do not exist yet). Here a component is a slice of a layer's tensors, not a param
  group, so the procedure rescales its update: it notes the slices before ``optimizer.step()`` and
  afterwards sets theta = theta_old + (lr_component / lr_group) (theta_new - theta_old), with lr_group
  the param group's learning rate for that step and base_lr its ``initial_lr`` (or its ``lr``
  without a scheduler). This is exactly a per-component learning rate for optimizers whose update is
  linear in the learning rate (SGD, Adam, AdamW: moments are untouched, as with a separate group);
  where lr_group is 0 the component does not move. W = ceil(``new_warmup_ratio`` x T) (the authors
  reuse the run's warm-up length; lorabench's run warm-up is ceil(train.warmup_ratio x T), 0.06 by
  default: keep the two equal). The authors' restart exists for their linear schedule only; with
  another ``train.schedule`` new components still follow L.
  With ``warmup_new=False`` every component follows the run's schedule (lorabench's earlier
  behaviour). Deviation: the authors keep released reserves' P, Q in the orthogonality regulariser
  after the budget is spent; here they leave it.

``state()`` reports the active rank per layer; ``state_dict()`` (checkpoints) holds the rank and
reserve masks, the steps at which each component's warm-up restarted, the importance EMAs and the
addition count, so a resumed run allocates and scales exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_positive
from lorabench.errors import ConfigError
from lorabench.methods.adapters.increlora import IncreLoraLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import PROCEDURES

GLOBAL = -1  # warm-up start of a component that follows the run's own schedule


def restart_lr_factor(step: int, start: int, warmup: int, total: int) -> float:
    """L(step - start - 1) of the authors' restarted linear schedule (module docstring): 0 at the
    step the group is added, then j / W while warming up, then linear decay to 0 at ``total``."""
    j = step - start - 1
    if j < 0:
        return 0.0
    if j < warmup:
        return j / max(1, warmup)
    horizon = total - start - 1
    return max(0.0, (horizon - j) / max(1, horizon - warmup))


@dataclass
class IncreLoraAllocParams:
    target_r: int = 8  # average active rank per layer at the end
    tinit: int = 0  # steps before the first addition
    delta_t: int = 10  # steps between additions
    add_per_round: int = 1  # modules that get a new component per round
    ipt_beta1: float = 0.85
    ipt_beta2: float = 0.85
    orth_reg_weight: float = 0.1
    advance_learn: bool = True  # authors' default (run_glue.py advance_learn=True)
    reserve_gate: float = 1e-5  # frozen lambda of a reserved component (add_reserve_param)
    warmup_new: bool = True  # authors' multi_lr=True: new components restart the linear warm-up
    new_warmup_ratio: float = 0.06  # W = ceil(ratio * max_steps); the authors reuse the run's warm-up

    def __post_init__(self) -> None:
        for key in ("target_r", "delta_t", "add_per_round"):
            check_positive(f"method.{key}", getattr(self, key))
        check_positive("method.orth_reg_weight", self.orth_reg_weight, allow_zero=True)
        check_positive("method.reserve_gate", self.reserve_gate)
        if not 0 <= self.new_warmup_ratio < 1:
            raise ConfigError(f"method.new_warmup_ratio={self.new_warmup_ratio!r} is invalid; it must be in [0, 1)")


@PROCEDURES.register("increlora")
class IncreLoraAllocator(Procedure):
    Params = IncreLoraAllocParams
    paper = "Zhang et al., 2023, arXiv:2308.12043"
    fidelity = Fidelity(
        reference="FeiyuZhang98/IncreLoRA",
        status="unchecked",
        unchecked=(
            "no parity fixture produced by the authors' code yet",
            "the authors add 4 components to each of 6 modules per round and scale by alpha / current rank; "
            "ours adds one component to one module per round and scales by alpha / r_max",
        ),
    )
    requires_adapter = ("increlora",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: IncreLoraAllocParams, ctx: MethodContext
    ) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, IncreLoraLayer)}
        if not self.layers:
            raise ValueError("the increlora procedure found no IncreLoRA layers")
        self.p = params
        self.optimizer = optimizer
        self.budget = params.target_r * len(self.layers)
        self.ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.additions = 0
        self.total_steps = max(ctx.max_steps, 1)
        self.warmup = math.ceil(params.new_warmup_ratio * ctx.max_steps)
        # per layer and component: the step at which the warm-up of its P column / Q row (pq) and of its
        # lambda (e) restarted; GLOBAL = the run's own schedule (initial components)
        self.pq_start = {n: [GLOBAL] * m.rank_mask.numel() for n, m in self.layers.items()}
        self.e_start = {n: [GLOBAL] * m.rank_mask.numel() for n, m in self.layers.items()}
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if params.advance_learn and self.total_rank() < self.budget:
            for name in self.layers:  # the authors' reserves, added at global step 0
                self._reserve(name, 0)

    def total_rank(self) -> int:
        return sum(m.rank() for m in self.layers.values())

    def _reserve(self, name: str, step: int) -> None:
        i = self.layers[name].reserve(self.p.reserve_gate)
        if i is not None:
            self.pq_start[name][i] = step

    def _grow(self, name: str, step: int) -> None:
        layer = self.layers[name]
        was_reserved = layer.reserved()
        i = layer.grow()
        if i is None:
            return
        self.additions += 1
        self.e_start[name][i] = step
        if was_reserved != i:  # no advance learning: P, Q start training now
            self.pq_start[name][i] = step
        if self.p.advance_learn:
            self._reserve(name, step)

    @torch.no_grad()
    def _orth_grad(self, layer: IncreLoraLayer) -> None:
        active = layer.rank_mask.bool() | layer.reserve_mask.bool()
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

    def lr_multipliers(self, name: str, step: int, groups: dict | None = None) -> dict[str, list[float]]:
        """Per component of layer ``name``, the factor lr_component / lr_group by which the procedure
        scales its update of step ``step`` (module docstring), for ``lora_P``, ``lora_Q`` and ``lora_E``:
        1 for the run's schedule, 0 for components that do not move."""
        layer = self.layers[name]
        groups = self._groups() if groups is None else groups
        active, reserved = layer.rank_mask.tolist(), layer.reserve_mask.tolist()
        out = {}
        for key, starts in (("lora_P", self.pq_start[name]), ("lora_Q", self.pq_start[name]), ("lora_E", None)):
            group = groups.get(id(getattr(layer, key)))
            factors = []
            for i, (a, r) in enumerate(zip(active, reserved)):
                start = self.e_start[name][i] if starts is None else starts[i]
                if not a and not (r and starts is not None):  # inactive, or a reserve's frozen lambda
                    factors.append(0.0)
                elif start == GLOBAL or group is None:
                    factors.append(1.0)
                else:
                    lr = float(group["lr"])
                    base = float(group.get("initial_lr", lr))
                    want = base * restart_lr_factor(step, start, self.warmup, self.total_steps)
                    factors.append(want / lr if lr > 0 else 0.0)
            out[key] = factors
        return out

    def _groups(self) -> dict[int, dict]:
        # looked up at every step: optimizer.load_state_dict replaces the group dicts
        return {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    @torch.no_grad()
    def _note(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pending, groups = [], self._groups()
        for name, layer in self.layers.items():
            for key, factors in self.lr_multipliers(name, step, groups).items():
                if all(f == 1.0 for f in factors):
                    continue
                tensor = getattr(layer, key)
                m = torch.tensor(factors, dtype=tensor.dtype, device=tensor.device)
                m = m.view(1, -1) if key == "lora_P" else m.view(-1, 1) if key == "lora_Q" else m
                pending.append((tensor, tensor.detach().clone(), m))
        return pending

    def after_backward(self, step: int) -> None:
        for layer in self.layers.values():
            self._orth_grad(layer)
        scores = self.module_scores()
        due = step > self.p.tinit and (step - self.p.tinit) % self.p.delta_t == 0
        total = self.total_rank()
        if due and total < self.budget:
            room = [n for n, m in self.layers.items() if m.rank() < m.rank_mask.numel()]
            for name in sorted(room, key=lambda n: -scores[n])[: min(self.p.add_per_round, self.budget - total)]:
                self._grow(name, step)
            if self.total_rank() >= self.budget:  # budget spent: the reserves play no further part
                for layer in self.layers.values():
                    layer.release()
        self._pending = self._note(step) if self.p.warmup_new else None

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """Rescale this step's update of new components (module docstring)."""
        for tensor, old, m in self._pending or ():
            tensor.copy_(torch.where(m == 1, tensor, old + (tensor - old) * m))
        self._pending = None

    def state(self) -> dict:
        return {"increlora_ranks": {n: m.rank() for n, m in self.layers.items()}, "increlora_additions": self.additions}

    def state_dict(self) -> dict:
        """The rank and reserve masks (buffers, not in the checkpoint's trainable tensors), each
        component's warm-up restart steps, the importance EMAs (as nested lists, about twice the
        adapter's size) and the number of additions."""
        params = {id(p): f"{n}.{k}" for n, m in self.layers.items() for k, p in m.named_parameters(recurse=False)}
        return {
            "masks": {n: m.rank_mask.tolist() for n, m in self.layers.items()},
            "reserve": {n: m.reserve_mask.tolist() for n, m in self.layers.items()},
            "pq_start": {n: list(v) for n, v in self.pq_start.items()},
            "e_start": {n: list(v) for n, v in self.e_start.items()},
            "additions": self.additions,
            "ema": {params[i]: [a.tolist(), b.tolist()] for i, (a, b) in self.ema.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, mask in state["masks"].items():
            self.layers[name].rank_mask.copy_(torch.tensor(mask))
        for name, layer in self.layers.items():  # checkpoints from before advance learning: no reserve
            layer.reserve_mask.copy_(torch.tensor(state.get("reserve", {}).get(name, [0.0] * layer.rank_mask.numel())))
            r = layer.rank_mask.numel()
            self.pq_start[name] = [int(s) for s in state.get("pq_start", {}).get(name, [GLOBAL] * r)]
            self.e_start[name] = [int(s) for s in state.get("e_start", {}).get(name, [GLOBAL] * r)]
        self._pending = None
        self.additions = int(state["additions"])
        params = {f"{n}.{k}": p for n, m in self.layers.items() for k, p in m.named_parameters(recurse=False)}
        self.ema = {
            id(params[key]): (
                torch.tensor(a, dtype=params[key].dtype, device=params[key].device),
                torch.tensor(b, dtype=params[key].dtype, device=params[key].device),
            )
            for key, (a, b) in state["ema"].items()
        }
