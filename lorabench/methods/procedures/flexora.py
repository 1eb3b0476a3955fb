"""Flexora (Wei, Shu, He and Yu, 2024, "Flexora: Flexible Low-Rank Adaptation for Large Language
Models", arXiv:2408.10774; NeurIPS 2024 FITML workshop, ACL 2025): choose the transformer layers whose
LoRA is fine-tuned, by hyper-parameter optimisation on validation data, then fine-tune LoRA there only.

The rule, as the authors' code runs it (kithib/Flexora@4449be816683, src/llamafactory/train/flora.py,
a BAdam ``BlockOptimizer`` with their additions; the fixture of scripts/parity/flexora.py pins it):

* initialisation: LoRA on every target of every layer l = 0..L-1 and one hyper-parameter alpha_l = 0
  per layer; the LoRA output of layer l is scaled by w_l^p, w = L softmax(alpha) (w = 1 at the
  start). The authors multiply the inputs of the module's lora_dropout, lora_A and lora_B by w_l
  (forward pre-hooks on every ``*lora*`` module), so the LoRA output carries w_l^3: p =
  ``flexora_gate_power`` = 3 (1 is the single scale the paper describes).
* flexible layer selection (the search), for t = 0..T-1, T = ``flexora_search_epochs`` passes over
  the training share: a training step on batch t with w detached,
      theta_{t+1} = AdamW_fresh(theta_t; clip_1(grad_theta L_train(theta_t, alpha_t)), lr_t),
  where AdamW_fresh is torch AdamW from an empty state at every step (the authors' BlockOptimizer
  with ``badam_switch_interval: 1`` rebuilds its copies and clears the state after each step:
  theta <- theta (1 - lr wd) - lr g / (|g| + 1e-8)), weight decay 0.01 (their groups take the wrapped
  AdamW's default), the gradient clipped to norm 1 (the HF Trainer's default), lr_t the cosine decay of
  the run's lr over the T steps; then a hyper step on the next ``flexora_hyper_batches`` batches of
  the validation share (cycled across steps, as their ``itertools.cycle``), in eval mode:
      alpha_{t+1} = Adam(alpha_t; h_t, lr = ``flexora_hyper_lr``),
      h_t = sum_v dL_val,v(theta_{t+1}, alpha) / d alpha at alpha_t   (``first_order``: the authors'
  code differentiates the loss at the stepped weights only). The paper calls the scheme unrolled
  differentiation; ``flexora_hypergradient: unrolled`` takes the gradient through one SGD step as well,
      h_t = d/d alpha sum_v L_val,v(theta_t - lr_t grad_theta L_train(theta_t, alpha), alpha),
  and the training step then uses that same gradient (one forward).
* selection: the layers with alpha_l > 0 (their ``selected_layer``; ``flexora_keep_layers: 0``), or the
  k largest alpha_l (``flexora_keep_layers: k``, their fixed-layer-count runs of 6/12/18/24 layers);
  if no alpha_l > 0, the largest one (a guard: the rule would keep no layer).
* fine-tuning: a fresh LoRA on the kept layers only, every other layer's LoRA frozen (the authors'
  second run, ``freeze_specific_layers`` with the list typed into workflow.py, reloads the model, so
  its LoRA starts from the init again): here every trainable tensor is restored to its value before the
  search, the gates go, the other layers' LoRA stop training with B = 0 (Delta W = 0). The run's own
  training then trains the kept layers' LoRA (and a task head) with the run's optimizer and schedule.

Scaled down from the paper's setting (Llama-3-8B and other 7-8B LLMs, LoRA on q_proj and v_proj,
HellaSwag / PIQA / Winogrande / RACE, search on up to 5000 training examples with 200 held out as
validation, lr 1e-4, batch 1 x 8 accumulation, one search epoch, 3 fine-tuning epochs): the search
takes the calibration batches (``train.init_batches`` training batches in dataset order, the same for
every seed), holds out the last ``flexora_val_fraction`` of them (at least one) as its validation data
and takes one batch per step; the layers are the model's transformer blocks (the largest
nn.ModuleList, so BERT-style encoders work too; the authors match ``layers.N``). Classification
heads train during the search and are restored with LoRA afterwards.

``state()`` reports alpha, the kept layers and modules, the rule and the search's cost (steps, seconds,
batches); ``flexora_keep_layers`` is the size knob of a budget (the alpha > 0 rule has no closed-form
count, so ``expected_trainable`` is None then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.procedures_selection import FlexoraParams
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.procedures.module_selection import (
    Cycle,
    GateHooks,
    SearchCost,
    block_index,
    candidate_sizes,
    check_same_selection,
    clip_,
    cosine_lr,
    finish,
    gate_gradient,
    kept_count,
    lora_candidates,
    search_mode,
    snapshot,
    split_batches,
    top_k,
    unrolled_hypergradient,
)
from lorabench.registry import PROCEDURES

REFERENCE = "kithib/Flexora@4449be816683"
WEIGHT_DECAY = 0.01  # the authors' effective value: BAdam's rebuilt groups take torch AdamW's default
MAX_GRAD_NORM = 1.0  # the HF Trainer's default max_grad_norm (flexora.yaml sets none)
EPS = 1e-8


def layer_gates(alpha: torch.Tensor, blocks: torch.Tensor, power: int) -> torch.Tensor:
    """(L softmax(alpha))[block of each candidate] ** power."""
    return (alpha.numel() * torch.softmax(alpha, dim=0))[blocks] ** power


def select_layers(alpha: list[float], keep: int) -> list[int]:
    """keep > 0: the ``keep`` largest; 0: every alpha_l > 0 (the largest one if none is)."""
    if keep > 0:
        return top_k(alpha, min(keep, len(alpha)))
    return [i for i, a in enumerate(alpha) if a > 0] or top_k(alpha, 1)


@dataclass
class FlexoraSearch:
    alpha: list[float]
    history: list[list[float]] = field(default_factory=list)  # alpha after each step
    val_loss: list[float] = field(default_factory=list)  # mean validation loss of each hyper step (first order)
    cost: dict = field(default_factory=dict)


def _unrolled_step(model, hooks, gates_of, alpha, theta, batch, hyper_batches, lr):
    """The unrolled hypergradient and the training gradient of this step (one training forward)."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in theta]

    def train_loss(weights):
        model.train()
        hooks.values = gates_of(alpha)
        return model(**batch).loss

    def val_loss(batch_v):
        def loss(weights):
            model.eval()
            hooks.values = gates_of(alpha)
            return torch.func.functional_call(model, dict(zip(keys, weights)), args=(), kwargs=batch_v).loss

        return loss

    h, grads = unrolled_hypergradient(train_loss, [val_loss(b) for b in hyper_batches], theta, alpha, lr)
    hooks.values = None
    return h, grads


def run_search(
    model: nn.Module, candidates, num_layers: int, train: list, val: list, params: FlexoraParams, lr: float
) -> FlexoraSearch:
    """The search loop (module docstring); leaves theta as the search trained it."""
    device = next(model.parameters()).device
    theta = [p for p in model.parameters() if p.requires_grad]
    alpha = torch.zeros(num_layers, device=device, requires_grad=True)
    hyper = torch.optim.Adam([alpha], lr=params.flexora_hyper_lr)
    inner = torch.optim.AdamW(theta, lr=lr, betas=(0.9, 0.999), eps=EPS, weight_decay=WEIGHT_DECAY)
    blocks = torch.tensor([c.block for c in candidates], device=device)

    def gates_of(a: torch.Tensor) -> torch.Tensor:
        return layer_gates(a, blocks, params.flexora_gate_power)

    hooks, val_cycle = GateHooks(candidates), Cycle(val)
    steps = params.flexora_search_epochs * len(train)
    result, cost = FlexoraSearch(alpha=[]), SearchCost(train_batches=len(train), val_batches=len(val))
    unrolled = params.flexora_hypergradient == "unrolled"
    try:
        for t in range(steps):
            lr_t = cosine_lr(lr, t, steps)
            batch, hyper_batches = train[t % len(train)], val_cycle.take(params.flexora_hyper_batches)
            if unrolled:
                h, grads = _unrolled_step(model, hooks, gates_of, alpha, theta, batch, hyper_batches, lr_t)
                for p, g in zip(theta, grads):
                    p.grad = g
            else:
                model.train()
                hooks.values = gates_of(alpha).detach()
                model(**batch).loss.backward()
                hooks.values = None
            clip_([p.grad for p in theta], MAX_GRAD_NORM)
            for group in inner.param_groups:
                group["lr"] = lr_t
            inner.state.clear()  # the authors' optimizer starts every step from an empty AdamW state
            inner.step()
            for p in theta:
                p.grad = None
            if not unrolled:
                model.eval()
                h, losses = gate_gradient(model, hooks, gates_of, alpha, hyper_batches)
                result.val_loss.append(sum(losses) / len(losses))
            alpha.grad = h
            hyper.step()
            alpha.grad = None
            result.history.append(alpha.detach().tolist())
            cost.steps += 1
            cost.val_forwards += len(hyper_batches)
    finally:
        hooks.remove()
    result.alpha, result.cost = alpha.detach().tolist(), cost.done()
    return result


@PROCEDURES.register("flexora")
class Flexora(Procedure):
    Params = FlexoraParams
    size_knob = "flexora_keep_layers"  # what a size budget sets (lorabench/budget.py): the top-k rule
    paper = "Wei et al., 2024, arXiv:2408.10774"
    backed_by = "lorabench"
    requires_adapter = ("lora",)
    fidelity = Fidelity(
        reference=f"{REFERENCE} src/llamafactory/train/flora.py (BlockOptimizer: hyper_param, inject_hyper_param,"
        " hyper_step, selected_layer), run on CPU with peft 0.21",
        status="parity",
        tolerance="alpha after each of 12-15 search steps within 1e-6 (3e-8 seen), the LoRA factors after the"
        " search within 1e-5 (4.2e-6 seen: the fresh AdamW step lr g / (|g| + 1e-8) magnifies rounding where a"
        " gradient entry is near 0); the selected layers equal (fp32, CPU; a 4-layer GQA Llama)",
        fixture="tests/fixtures/parity/flexora.json",
        deviations=(
            "the search data are the calibration batches (train.init_batches, in dataset order, cycled for"
            " flexora_search_epochs passes) with the last flexora_val_fraction held out, one batch per step; the"
            " authors hold out val_size examples at random and take one shuffled epoch of 1 x 8-accumulated steps",
            "the search's lr follows a cosine over its steps from the run's lr; the authors' warmup_steps: 0.1"
            " makes their very first step's lr 0",
            "the gate scales the output of lora_B by w^3 (the same function as the authors' three pre-hooks on the"
            " inputs of lora_dropout, lora_A and lora_B, up to rounding)",
            "the fine-tuning stage follows in the same run and restores the LoRA init the search started from (the"
            " authors start a second run from the same seed and type the selected layers into workflow.py by hand)",
            "if no alpha_l > 0, the largest alpha_l's layer is kept (the authors' rule would keep none)",
            "classification heads (not in the authors' setting) train during the search and are restored after",
        ),
        unchecked=(
            "the HF Trainer around the optimizer: the parity script replays its step (backward, clip 1.0, lr of the"
            " step, optimizer.step, zero_grad)",
            "flexora_hypergradient: unrolled, flexora_keep_layers > 0 and flexora_gate_power != 3 are not in the"
            " authors' code (checked by tests/test_module_selection.py)",
        ),
    )

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: FlexoraParams, ctx: MethodContext
    ) -> None:
        self.params = params
        self.candidates = lora_candidates(model, "flexora", params.rank)
        self.num_layers, _ = block_index(model)
        outside = [c.name for c in self.candidates if c.block is None]
        if self.num_layers == 0 or outside:
            raise ConfigError(
                f"method.procedure=flexora gates LoRA per transformer layer; these targets lie outside the layer"
                f" list: {outside[:3]}"
            )
        if params.flexora_hypergradient == "unrolled" and any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
        ):
            raise ConfigError(
                "method.flexora_hypergradient=unrolled differentiates a gradient (double backward): "
                "it needs hardware.gradient_checkpointing=false"
            )
        device = next(model.parameters()).device
        train, val = split_batches(ctx, params.flexora_val_fraction, "flexora", device)
        with search_mode(model):
            before = snapshot(model)
            self.search = run_search(model, self.candidates, self.num_layers, train, val, params, ctx.lr)
            self.layers = select_layers(self.search.alpha, params.flexora_keep_layers)
            self.kept = [i for i, c in enumerate(self.candidates) if c.block in self.layers]
            finish(model, self.candidates, self.kept, restore=before)
        ctx.extras.update(self.state())  # in the record from the start (a failed run keeps it too)

    def expected_trainable(self, base_model: nn.Module, params: FlexoraParams, ctx: MethodContext) -> int | None:
        """k layers' LoRA (r (d_in + d_out) per target) plus the task head, when every layer holds the same
        targets; None for the alpha > 0 rule (the count is known after the search only)."""
        if params.flexora_keep_layers == 0:
            return None
        num_layers, _ = block_index(base_model)
        sizes = candidate_sizes(base_model, ctx, params.rank)
        if num_layers == 0 or any(block is None for block, _ in sizes):
            return None
        per_layer = [sum(s for block, s in sizes if block == i) for i in range(num_layers)]
        return kept_count(per_layer, params.flexora_keep_layers, base_model, ctx)

    def state(self) -> dict:
        return {
            "flexora_alpha": self.search.alpha,
            "flexora_layers": self.layers,
            "flexora_num_layers": self.num_layers,
            "flexora_rule": "top_k" if self.params.flexora_keep_layers else "alpha_positive",
            "flexora_kept_modules": [self.candidates[i].name for i in self.kept],
            "flexora_trainable_lora": sum(self.candidates[i].size() for i in self.kept),
            "flexora_hypergradient": self.params.flexora_hypergradient,
            "flexora_search": self.search.cost,
        }

    def state_dict(self) -> dict:
        return {"layers": self.layers, "alpha": self.search.alpha, "search_cost": self.search.cost}

    def load_state_dict(self, state: dict) -> None:
        """The rebuilt run searched again (deterministically): it must have chosen the same layers. The
        report keeps the cost of the search that chose them (the original run's)."""
        check_same_selection("flexora", "layers", self.layers, state.get("layers", self.layers))
        self.search.cost = dict(state.get("search_cost", self.search.cost))
