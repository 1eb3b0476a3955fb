"""DiffoRA (Jiang, Wang and Yuan, 2025, "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via
Differential Low-Rank Matrix Adaptation", arXiv:2502.08905; v2 retitled "... via Differential Module
Selection"): decide per module whether it gets LoRA, by a differentiable search, then fine-tune LoRA
on the chosen modules only.

What the paper states (its abstract; the full text and any code could not be reached from here): a
Differential Adaptation Matrix (DAM) says which modules are "suitable and essential" to fine-tune; it
is built by continuous relaxation and discretisation with weight-sharing optimisations, DARTS-like.
The rest is our reading, written as DARTS (Liu et al., 2019, arXiv:1806.09055) does its search:

* DAM: one entry gamma_m in {0, 1} per candidate module m (every LoRA target of the run),
  W_m = W0_m + gamma_m s B_m A_m.
* relaxation: gamma_m -> lambda_m = sigmoid(a_m), a_m = 0 at the start (lambda = 1/2): DARTS' softmax
  over the two candidates {LoRA, no LoRA} of a module, exp(a_m) / (exp(a_m) + exp(0)).
* search, for t = 0..T-1 (T = ``diffora_search_epochs`` passes over the training share), first-order
  DARTS with weight sharing (one set of LoRA factors shared by every sub-network the relaxation mixes):
      theta <- AdamW(theta; grad_theta L_train(theta, lambda)), lambda held fixed (the run's lr and weight
               decay; the AdamW state persists over the search);
      a     <- Adam(a; grad_a L_val(theta, sigmoid(a))) on the next validation batch, DARTS' architecture
               optimizer: lr ``diffora_gate_lr`` 3e-4, betas (0.5, 0.999), weight decay 1e-3.
  (The weight step comes first: at the start B = 0, so a gate step would see a zero gradient.)
* discretisation: gamma_m = 1 for the k largest lambda_m, k = ``diffora_keep_modules`` or, when that is 0,
  round(``diffora_keep_ratio`` x candidates) (half up, at least 1); ties go to the earlier module.
* weight sharing (``diffora_weight_sharing: true``): the kept modules continue from the LoRA the search
  trained, with lambda_m folded into B (B_m <- lambda_m B_m, so each kept Delta W is the one the search's
  forward used) and a task head as the search left it; ``false`` restores every trainable tensor to its
  value before the search (a fresh LoRA on the kept modules, Delta W = 0). Modules not kept: B = 0, A and
  B frozen (Delta W = 0). The run's own training then trains the kept modules' LoRA (and the head).

Scaled down: the search takes the calibration batches (``train.init_batches`` training batches in
dataset order, the same for every seed), with the last ``diffora_val_fraction`` of them (DARTS: half
the data) held out for the gate steps. ``state()`` reports every lambda, the kept modules, the
trainable LoRA count and the search's cost; ``diffora_keep_modules`` is the size knob of a budget
(its count is closed-form when every candidate has the same shape, e.g. BERT's query/value; with
GQA's narrower v_proj it depends on which modules win, and ``expected_trainable`` is None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lorabench.method_params.procedures_selection import DifforaParams
from lorabench.methods.base import MethodContext, Procedure, decay_groups
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.procedures.module_selection import (
    Cycle,
    GateHooks,
    SearchCost,
    candidate_sizes,
    check_same_selection,
    finish,
    gate_gradient,
    kept_count,
    lora_candidates,
    search_mode,
    snapshot,
    split_batches,
    top_k,
)
from lorabench.registry import PROCEDURES

GATE_BETAS = (0.5, 0.999)  # DARTS' architecture Adam


def keep_count(params: DifforaParams, candidates: int) -> int:
    if params.diffora_keep_modules > 0:
        return min(params.diffora_keep_modules, candidates)
    return min(candidates, max(1, math.floor(params.diffora_keep_ratio * candidates + 0.5)))  # half up


@dataclass
class DifforaSearch:
    gates: list[float]  # lambda = sigmoid(a) after the search
    history: list[list[float]] = field(default_factory=list)  # a after each step
    val_loss: list[float] = field(default_factory=list)
    cost: dict = field(default_factory=dict)


def run_search(
    model: nn.Module, candidates, train: list, val: list, params: DifforaParams, lr: float, weight_decay: float
) -> DifforaSearch:
    """The alternating search (module docstring); leaves theta as the search trained it."""
    device = next(model.parameters()).device
    theta = [p for p in model.parameters() if p.requires_grad]
    logits = torch.zeros(len(candidates), device=device, requires_grad=True)
    gates = torch.optim.Adam(
        [logits], lr=params.diffora_gate_lr, betas=GATE_BETAS, weight_decay=params.diffora_gate_weight_decay
    )
    weights = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    hooks, val_cycle = GateHooks(candidates), Cycle(val)
    steps = params.diffora_search_epochs * len(train)
    result, cost = DifforaSearch(gates=[]), SearchCost(train_batches=len(train), val_batches=len(val))
    try:
        for t in range(steps):
            model.train()
            hooks.values = torch.sigmoid(logits).detach()
            model(**train[t % len(train)]).loss.backward()
            hooks.values = None
            weights.step()
            for p in theta:
                p.grad = None
            model.eval()
            logits.grad, losses = gate_gradient(model, hooks, torch.sigmoid, logits, val_cycle.take(1))
            gates.step()
            logits.grad = None
            result.history.append(logits.detach().tolist())
            result.val_loss.append(losses[0])
            cost.steps, cost.val_forwards = cost.steps + 1, cost.val_forwards + 1
    finally:
        hooks.remove()
    result.gates, result.cost = torch.sigmoid(logits).detach().tolist(), cost.done()
    return result


@PROCEDURES.register("diffora")
class Diffora(Procedure):
    Params = DifforaParams
    size_knob = "diffora_keep_modules"  # what a size budget sets (lorabench/budget.py)
    paper = "Jiang et al., 2025, arXiv:2502.08905"
    backed_by = "lorabench"
    requires_adapter = ("lora",)
    fidelity = Fidelity(
        reference="no code found (GitHub repositories named like 'diffora' and a code search hold none); the rule"
        " is our reading of the paper's abstract, written as DARTS' first-order search (arXiv:1806.09055)",
        status="rule",
        deviations=(
            "the paper's full text was not reachable: the relaxation (a sigmoid per module, DARTS' two-candidate"
            " softmax), the schedule (one weight step then one gate step per training batch), the optimizers"
            " (AdamW at the run's lr for LoRA, DARTS' Adam 3e-4 / betas (0.5, 0.999) / weight decay 1e-3 for the"
            " gates), the global top-k with k = half the candidates and 'weight sharing' read as the kept"
            " modules inheriting the searched LoRA (gate folded into B) are ours",
            "the search data are the calibration batches (train.init_batches, dataset order) with the last"
            " diffora_val_fraction held out for the gate steps",
        ),
    )

    def size_limit(self, shapes: list[tuple[int, int]], params: DifforaParams) -> int:
        """Every candidate kept."""
        return max(1, len(shapes))

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: DifforaParams, ctx: MethodContext
    ) -> None:
        self.params = params
        self.candidates = lora_candidates(model, "diffora", params.rank)
        device = next(model.parameters()).device
        train, val = split_batches(ctx, params.diffora_val_fraction, "diffora", device)
        with search_mode(model):
            before = None if params.diffora_weight_sharing else snapshot(model)
            self.search = run_search(model, self.candidates, train, val, params, ctx.lr, ctx.weight_decay)
            gates = self.search.gates
            self.kept = top_k(gates, keep_count(params, len(self.candidates)))
            folded = {i: gates[i] for i in self.kept} if params.diffora_weight_sharing else None
            finish(model, self.candidates, self.kept, restore=before, scale_kept=folded)
        ctx.extras.update(self.state())  # in the record from the start (a failed run keeps it too)

    def expected_trainable(self, base_model: nn.Module, params: DifforaParams, ctx: MethodContext) -> int | None:
        """k modules' LoRA, r (d_in + d_out) each, plus the task head, when every candidate has the same
        shape; None otherwise (the count depends on which modules win)."""
        sizes = [size for _, size in candidate_sizes(base_model, ctx, params.rank)]
        return kept_count(sizes, keep_count(params, len(sizes)), base_model, ctx) if sizes else None

    def state(self) -> dict:
        return {
            "diffora_gates": {c.name: g for c, g in zip(self.candidates, self.search.gates)},
            "diffora_kept_modules": [self.candidates[i].name for i in self.kept],
            "diffora_num_candidates": len(self.candidates),
            "diffora_trainable_lora": sum(self.candidates[i].size() for i in self.kept),
            "diffora_weight_sharing": self.params.diffora_weight_sharing,
            "diffora_search": self.search.cost,
        }

    def state_dict(self) -> dict:
        return {"kept": self.kept, "gates": self.search.gates, "search_cost": self.search.cost}

    def load_state_dict(self, state: dict) -> None:
        """The rebuilt run searched again (deterministically): it must have kept the same modules. The
        report keeps the cost of the search that chose them (the original run's)."""
        check_same_selection("diffora", "modules", self.kept, state.get("kept", self.kept))
        self.search.cost = dict(state.get("search_cost", self.search.cost))
