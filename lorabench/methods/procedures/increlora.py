"""IncreLoRA's incremental rank allocation (Zhang et al., 2023, arXiv:2308.12043), run from the loop.

The authors' rule (FeiyuZhang98/IncreLoRA@51a2d734af78: loralib/loralib/increlora.py ``RankAllocator``
and ``SVDLinear``; NLU/src/transformers/trainer.py ``compute_svd_orth_regu`` and the allocation after
clipping, before ``optimizer.step()``; NLU/src/transformers/optimization.py ``Multi_LambdaLR``).
With n adapted modules, a = ``incre_rank_num`` components per selected module (0: the authors' table
2 -> 1, 4 -> 2, 6 -> 3, 8 -> 4 for ``target_r``), budget B = ``target_r`` x n and after the backward of
0-based step t (``after_backward``):

1. Orthogonality regulariser, added to the gradient: gamma d/dtheta of
   (1 / 2n) sum_l (||Q_l Q_l^T - I||_F + ||P_l^T P_l - I||_F) over every created component of each
   layer (active, reserved, released), gamma = ``orth_reg_weight``; the gradient reaches the P
   columns and Q rows that train (frozen reserves get none).
2. At t = 0, every module creates a reserves (``advance_learn``: lambda frozen at ``reserve_gate`` =
   1e-5, P and Q training through that gate; otherwise lambda = 0 and P, Q frozen).
3. While the total active rank is below B: each module's importance from this backward,
   s_l = sum |Delta W_l * dL/dDelta W_l| / sqrt(d_out d_in) (the layer's hook), is smoothed as
   I_l = b1 I_l + (1 - b1) s_l, U_l = b2 U_l + (1 - b2) |s_l - I_l| (b1 = b2 = 0.85), and if
   t > tinit and t mod delta_t = 0 a round runs: k = min(``add_per_round``, B - total), threshold
   = the k-th largest I_l U_l, and every module with I_l U_l >= threshold activates its a reserves
   (lambda starts from its reserve value and trains; the scale alpha / (r_a + 1e-5) follows the new
   rank) and creates a new reserves. The total can pass B at the last round (the authors'
   k counts modules against a budget counted in ranks). If it lands on B exactly, every reserve is
   released (lambda = 0; its P and Q stay in the regulariser and keep training) and scoring stops.
4. Learning rates (``warmup_new``, the authors' ``multi_lr``): every batch of new tensors is a new
   param group in the authors' optimizer, so it has its own AdamW step count and its own restart of
   the linear schedule: a group made during step t_g (the reserves' P and Q when created, the
   activated lambda, and without advance learning P and Q at activation) is not updated at t_g (no
   gradient yet) and at step t > t_g takes AdamW's update with step count k = t - t_g and learning
   rate base_lr L(t - t_g - 1), L(j) = j / W for j < W, else max(0, (H - j) / (H - W)),
   H = T - t_g - 1, T = ``train.max_steps``, W = ceil(``new_warmup_ratio`` T) (the authors reuse the
   run's warm-up: keep it equal to ``train.warmup_ratio``). Here a component is a slice of a layer's
   tensors, so ``on_step_end`` recomputes those slices: theta = theta_old (1 - lr wd) -
   lr / (1 - b1^k) m / (sqrt(v) / sqrt(1 - b2^k) + eps), torch's AdamW update from the slice's
   moments (which start at 0 with the component's first gradient, as the group's do) with the
   component's own k and lr; slices of components that are not training are restored. This needs
   torch's Adam/AdamW (decoupled weight decay). The initial components follow the run's optimizer
   and schedule unchanged. ``warmup_new=False``: new components keep their own step count and take
   the run's learning rate.

Schedule defaults (the authors' SST-2 rank-8 script, NLU/scripts/rank=8/run_sst2.sh): target_r 8,
add_per_round (their top_h) 6, a = 4, init_warmup = incre_interval = 1000 of ~50,500 steps: here
``delta_t`` = 0 means max(1, round(``interval_ratio`` T)) with ``interval_ratio`` 0.02 and ``tinit`` =
-1 means tinit = delta_t; orth_reg_weight 0.1, b1 = b2 = 0.85, advance_learn and multi_lr on.

``state()`` reports the active rank per layer, the rounds and additions, the total rank against the
budget; ``state_dict()`` (checkpoints) holds the masks, every component's start steps, the importance
EMAs and the counters, so a resumed run allocates and steps exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.procedures import IncreLoraAllocParams
from lorabench.methods.adapters.increlora import REPO, IncreLoraLayer, components_per_round
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import PROCEDURES

GLOBAL = -1  # start of a component that follows the run's own optimizer step count and schedule
# None as a start: the slice does not train (not created, a frozen reserve's P/Q, a reserve's lambda)


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


def _check_adam(optimizer: torch.optim.Optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(
            f"the increlora procedure steps new components as separate AdamW groups and needs "
            f"optimizer adamw (got {type(inner).__name__})"
        )
    for group in inner.param_groups:
        decoupled = group.get("decoupled_weight_decay", isinstance(inner, torch.optim.AdamW))
        if group.get("amsgrad") or group.get("maximize") or (group["weight_decay"] and not decoupled):
            raise ConfigError("the increlora procedure needs AdamW without amsgrad or maximize")


@PROCEDURES.register("increlora")
class IncreLoraAllocator(Procedure):
    Params = IncreLoraAllocParams
    paper = "Zhang et al., 2023, arXiv:2308.12043"
    fidelity = Fidelity(
        reference=f"{REPO} loralib/loralib/increlora.py (RankAllocator), NLU trainer.py (compute_svd_orth_regu),"
        " NLU optimization.py (Multi_LambdaLR)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12-16 AdamW steps (fp32, CPU); ranks, rounds and chosen modules exactly",
        fixture="tests/fixtures/parity/increlora.json",
        deviations=(
            "tinit and delta_t default to 2% of train.max_steps (the authors give steps: 1000 of ~50,500 in their"
            " SST-2 script); set method.delta_t / method.tinit for steps",
            "new components are slices of preallocated tensors, stepped by recomputing torch's AdamW update with"
            " their own step count and learning rate (the authors' separate param groups); optimizer adamw only",
            "warmup_new=false: new components take the run's learning rate (the authors' non-multi_lr scheduler"
            " leaves added groups at the constant base rate)",
        ),
        unchecked=(
            "the authors' trainer steps with transformers' own AdamW (eps added outside the bias correction); the"
            " parity runs torch's AdamW, lorabench's optimizer, on both sides",
            "gradient accumulation and DDP: scores come from the last micro-batch's backward on each process, as"
            " the authors' hook; not run by the parity cases",
            "ties in the importance scores (every module at the threshold is chosen on both sides): not in the cases",
        ),
        revision=2,
    )
    requires_adapter = ("increlora",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: IncreLoraAllocParams, ctx: MethodContext
    ) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, IncreLoraLayer)}
        if not self.layers:
            raise ValueError("the increlora procedure found no IncreLoRA layers")
        _check_adam(optimizer)
        self.p = params
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.per_round = components_per_round(params.target_r, params.incre_rank_num)
        self.budget = params.target_r * len(self.layers)
        self.total_steps = max(ctx.max_steps, 1)
        self.interval = params.delta_t or max(1, round(params.interval_ratio * ctx.max_steps))
        self.tinit = params.tinit if params.tinit >= 0 else self.interval
        self.warmup = math.ceil(params.new_warmup_ratio * ctx.max_steps)
        for name, m in self.layers.items():
            if m.rank() + self.per_round > m.r_max:
                raise ConfigError(
                    f"{name}: r_max={m.r_max} cannot hold {m.rank()} components and {self.per_round} reserves"
                )
        active = {n: m.rank_mask.bool().tolist() for n, m in self.layers.items()}
        self.pq_start = {n: [GLOBAL if a else None for a in act] for n, act in active.items()}
        self.e_start = {n: [GLOBAL if a else None for a in act] for n, act in active.items()}
        self.ema: dict[str, tuple] = {n: (0, 0) for n in self.layers}  # the authors start from 0
        self.started = False  # reserves are created after the backward of step 0
        self.rounds = self.additions = 0
        self.last_round: dict = {}
        self._pending: list | None = None
        self._step = -1
        self._set_tracking()

    # -- bookkeeping --------------------------------------------------------------------------------

    def total_rank(self) -> int:
        return sum(m.rank() for m in self.layers.values())

    def _set_tracking(self) -> None:
        scoring = self.total_rank() < self.budget
        for m in self.layers.values():
            m.track_score = scoring

    def _create(self, name: str, step: int) -> None:
        gate = self.p.reserve_gate if self.p.advance_learn else 0.0
        for i in self.layers[name].create(self.per_round, gate):
            self.pq_start[name][i] = step if self.p.advance_learn else None
            self.e_start[name][i] = None

    def _activate(self, name: str, step: int) -> None:
        for i in self.layers[name].activate():
            self.e_start[name][i] = step
            if not self.p.advance_learn:
                self.pq_start[name][i] = step
            self.additions += 1
        self._create(name, step)

    def module_scores(self) -> dict[str, torch.Tensor]:
        """I_l U_l per module (the authors' ``calculate_score``)."""
        return {n: i_bar * u_bar for n, (i_bar, u_bar) in self.ema.items()}

    # -- the hooks ----------------------------------------------------------------------------------

    def _orth_grad(self) -> None:
        if self.p.orth_reg_weight == 0:
            return
        tensors, terms = [], []
        with torch.enable_grad():
            for m in self.layers.values():
                idx = m.created().nonzero()[:, 0]
                q, p = m.lora_Q[idx], m.lora_P[:, idx]
                for cov in (q @ q.T, p.T @ p):
                    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                    terms.append(torch.norm(cov - eye, p="fro"))
                tensors += [m.lora_P, m.lora_Q]
            reg = self.p.orth_reg_weight * (sum(terms) / len(terms))
            grads = torch.autograd.grad(reg, tensors)
        with torch.no_grad():
            for k, (name, m) in enumerate(self.layers.items()):
                frozen = torch.tensor([s is None for s in self.pq_start[name]], device=m.lora_P.device)
                g_p, g_q = grads[2 * k], grads[2 * k + 1]
                g_p[:, frozen] = 0
                g_q[frozen] = 0
                for param, g in ((m.lora_P, g_p), (m.lora_Q, g_q)):
                    if param.grad is None:
                        param.grad = g
                    else:
                        param.grad.add_(g)

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = self.p.ipt_beta1, self.p.ipt_beta2
        for name, m in self.layers.items():
            ipt = m.score if m.score is not None else torch.zeros((), device=m.lora_E.device)
            i_bar, u_bar = self.ema[name]
            i_bar = b1 * i_bar + (1 - b1) * ipt
            u_bar = b2 * u_bar + (1 - b2) * (ipt - i_bar).abs()
            self.ema[name] = (i_bar, u_bar)

    def _round(self, step: int) -> None:
        room = [n for n, m in self.layers.items() if int(m.created().sum()) + self.per_round <= m.r_max]
        k = min(self.p.add_per_round, self.budget - self.total_rank(), len(room))
        if k <= 0:
            return
        scores = self.module_scores()
        values = torch.stack([torch.as_tensor(scores[n], dtype=torch.float32) for n in room])
        threshold = torch.topk(values, k)[0][-1].item()
        chosen = [n for n in room if scores[n] >= threshold]
        for name in chosen:
            self._activate(name, step)
        self.rounds += 1
        self.last_round = {"step": step, "threshold": threshold, "chosen": chosen}
        if self.total_rank() == self.budget:  # budget spent exactly: the reserves play no further part
            for m in self.layers.values():
                m.release()
        self._set_tracking()

    def after_backward(self, step: int) -> None:
        self._orth_grad()
        if not self.started:  # the authors' reserves, made at global step 0
            for name in self.layers:
                self._create(name, step)
            self.started = True
        if self.total_rank() < self.budget:
            self._update_scores()
            if step > self.tinit and step % self.interval == 0:
                self._round(step)
        self._step = step
        self._pending = self._note()

    def _groups(self) -> dict[int, dict]:
        # looked up at every step: optimizer.load_state_dict replaces the group dicts
        return {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    @torch.no_grad()
    def _note(self) -> list[tuple]:
        """The slices that do not follow the run's optimizer: tensor, values before the step, starts,
        component axis, the group's learning rate for this step."""
        pending, groups = [], self._groups()
        for name, m in self.layers.items():
            for tensor, starts, dim in (
                (m.lora_P, self.pq_start[name], 1),
                (m.lora_Q, self.pq_start[name], 0),
                (m.lora_E, self.e_start[name], 0),
            ):
                if all(s == GLOBAL for s in starts):
                    continue
                group = groups.get(id(tensor))
                pending.append((tensor, tensor.detach().clone(), list(starts), dim, group["lr"] if group else 0.0))
        return pending

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """Step the slices of new components as their own AdamW groups; restore those that do not train."""
        t, groups = self._step, self._groups()
        for tensor, old, starts, dim, run_lr in self._pending or ():
            group, state = groups.get(id(tensor)), self.optimizer.state.get(tensor, {})
            by_start: dict = {}
            for i, s in enumerate(starts):
                if s != GLOBAL:
                    by_start.setdefault(s, []).append(i)
            out = tensor.detach()
            for s, comps in by_start.items():
                idx = torch.tensor(comps, device=tensor.device)
                if s is None or t <= s or group is None or "exp_avg" not in state:
                    out.index_copy_(dim, idx, old.index_select(dim, idx))
                    continue
                base = float(group.get("initial_lr", group["lr"]))
                lr = base * restart_lr_factor(t, s, self.warmup, self.total_steps) if self.p.warmup_new else run_lr
                out.index_copy_(dim, idx, self._adamw_slice(old, state, group, dim, idx, lr, t - s))
        self._pending = None

    @staticmethod
    def _adamw_slice(old, state, group, dim: int, idx, lr: float, k: int) -> torch.Tensor:
        """torch's single-tensor AdamW step on a slice, with step count ``k`` and learning rate ``lr``."""
        beta1, beta2 = group["betas"]
        param = old.index_select(dim, idx)
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        bias_correction1 = 1 - beta1**k
        bias_correction2_sqrt = (1 - beta2**k) ** 0.5
        denom = (state["exp_avg_sq"].index_select(dim, idx).sqrt() / bias_correction2_sqrt).add_(group["eps"])
        param.addcdiv_(state["exp_avg"].index_select(dim, idx), denom, value=-(lr / bias_correction1))
        return param

    # -- report and checkpoints ---------------------------------------------------------------------

    def state(self) -> dict:
        allocated = sum(int(m.created().sum()) * (m.in_features + m.out_features + 1) for m in self.layers.values())
        return {
            "increlora_ranks": {n: m.rank() for n, m in self.layers.items()},
            "increlora_total_rank": self.total_rank(),
            "increlora_budget": self.budget,
            "increlora_rounds": self.rounds,
            "increlora_additions": self.additions,
            "increlora_interval": [self.tinit, self.interval],
            "increlora_allocated_params": allocated,  # created components, as the authors' model counts them
        }

    def state_dict(self) -> dict:
        """The rank and reserve masks (buffers, not in the checkpoint's trainable tensors), each
        component's start steps, the importance EMAs and the counters."""
        return {
            "masks": {n: m.rank_mask.tolist() for n, m in self.layers.items()},
            "reserve": {n: m.reserve_mask.tolist() for n, m in self.layers.items()},
            "pq_start": {n: list(v) for n, v in self.pq_start.items()},
            "e_start": {n: list(v) for n, v in self.e_start.items()},
            "ema": {n: [float(a), float(b)] for n, (a, b) in self.ema.items()},
            "started": self.started,
            "rounds": self.rounds,
            "additions": self.additions,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, layer in self.layers.items():
            layer.rank_mask.copy_(torch.tensor(state["masks"][name]))
            layer.reserve_mask.copy_(torch.tensor(state["reserve"][name]))
            self.pq_start[name] = [None if s is None else int(s) for s in state["pq_start"][name]]
            self.e_start[name] = [None if s is None else int(s) for s in state["e_start"][name]]
            i_bar, u_bar = state["ema"][name]
            device = layer.lora_E.device
            self.ema[name] = (torch.tensor(i_bar, device=device), torch.tensor(u_bar, device=device))
        self.started = bool(state["started"])
        self.rounds, self.additions = int(state["rounds"]), int(state["additions"])
        self._pending = None
        self._set_tracking()
