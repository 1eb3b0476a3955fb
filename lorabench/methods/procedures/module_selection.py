"""What DiffoRA and Flexora share (lorabench/methods/procedures/diffora.py, flexora.py): choose where
LoRA goes by a differentiable search, then train LoRA there only.

Both procedures run on the peft ``lora`` adapter, which has put LoRA on every candidate module (the
run's target modules). For the search each candidate m gets a gate g_m that scales its LoRA output,

    y_m = W0_m x + g_m s B_m A_m x,

through a forward hook on the module's ``lora_B`` (``GateHooks``; g_m = 1, or no hook, is plain
LoRA). ``setup`` runs the search before the run's first step, on the calibration batches
(``train.init_batches`` real training batches, the same for every seed): the last share of them is
held out as the validation data of the bilevel problem (``split_batches``), the rest is the search's
training data. A search step is a weight step on the next training batch (the gates held fixed)
followed by a gate step on validation batches, min_g L_val(theta*(g), g) with theta trained on
L_train(theta, g); ``gate_gradient`` is the first-order hypergradient sum_b dL_val,b / d(gate
parameter) at the current weights, ``unrolled_hypergradient`` the one that also differentiates
through one SGD step of the weights. Then the discretisation keeps the modules (or layers) with the
largest gates (``top_k``); ``finish`` freezes the LoRA of every other candidate with B = 0 (its
Delta W = 0: it is as if it carried no LoRA) and restores the kept LoRA and the task head to their
values before the search (a restart) or keeps what the search trained (weight sharing). The run's
own training then trains the kept LoRA (and the head) only, so the trainable count after
``apply_method`` is that of the kept modules: ``expected_trainable`` computes it from the base
model when it does not depend on which modules win (candidates of one size).

The search runs where the model is when the method is applied (the CPU in ``lorabench train``,
before ``accelerate`` moves it, like the calibration of LoRA-GA or EVA) on a fork of the RNG, so the
run's own random draws are those of a plain LoRA run. A rebuilt run (resume, export) runs the same,
deterministic search again; ``state_dict`` keeps the selection (a resume checks it) and the
search's cost (the resumed run reports the original search's).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext, head_parameter_count, target_linear_weights
from lorabench.methods.procedures.lisa import transformer_layers

ADAPTER = "default"  # the peft adapter name lorabench's lora adapter creates


@dataclass
class Candidate:
    """One LoRA-wrapped module: its name in the wrapped model, peft's layer, its transformer layer."""

    name: str
    layer: nn.Module
    block: int | None

    @property
    def lora_a(self) -> nn.Parameter:
        return self.layer.lora_A[ADAPTER].weight

    @property
    def lora_b(self) -> nn.Parameter:
        return self.layer.lora_B[ADAPTER].weight

    def size(self) -> int:
        return self.lora_a.numel() + self.lora_b.numel()


def block_index(model: nn.Module) -> tuple[int, dict[int, int]]:
    """(number of transformer layers, id(module) -> its layer) for every module inside the layer list
    (found as in LISA: the nn.ModuleList holding the most parameters); (0, {}) without one."""
    try:
        _, blocks = transformer_layers(model)
    except ConfigError:
        return 0, {}
    return len(blocks), {id(m): i for i, block in enumerate(blocks) for m in block.modules()}


def lora_candidates(model: nn.Module, who: str, rank: int | None = None) -> list[Candidate]:
    """The modules the lora adapter wrapped, in model order. Plain LoRA of rank ``rank`` only: the gate
    scales the output of ``lora_B``, which DoRA does not use, and the trainable count assumes A and B
    of that rank train."""
    from peft.tuners.lora import LoraLayer

    _, block_of = block_index(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        if ADAPTER in getattr(module, "lora_variant", {}) or module.use_dora.get(ADAPTER, False):
            raise ConfigError(f"method.procedure={who} gates plain LoRA: method.use_dora must be false")
        candidate = Candidate(name, module, block_of.get(id(module)))
        if not candidate.lora_a.requires_grad:
            raise ConfigError(
                f"method.procedure={who} trains A and B of the kept modules: method.freeze_a must be false"
            )
        if rank is not None and candidate.lora_a.shape[0] != rank:
            raise ConfigError(
                f"method.procedure={who} sizes the kept modules with method.rank={rank}, but {name} has LoRA of "
                f"rank {candidate.lora_a.shape[0]}"
            )
        found.append(candidate)
    if not found:
        raise ConfigError(f"method.procedure={who} found no LoRA layer to choose from (it needs method.adapter=lora)")
    return found


class GateHooks:
    """While installed, multiplies candidate i's LoRA output by ``values[i]`` (a tensor; it may carry
    the graph to the gate parameters). ``values = None`` leaves the output as it is."""

    def __init__(self, candidates: list[Candidate]):
        self.values: torch.Tensor | None = None
        self.handles = [c.layer.lora_B[ADAPTER].register_forward_hook(self._hook(i)) for i, c in enumerate(candidates)]

    def _hook(self, i: int):
        def hook(module, args, output):
            if self.values is None:
                return output
            return output * self.values[i].to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.values = [], None


def split_batches(ctx: MethodContext, val_fraction: float, who: str, device) -> tuple[list[dict], list[dict]]:
    """(training share, validation share) of the calibration batches: the last max(1, round(f n))
    of the n batches are held out (rounded half up), at least one stays for training."""
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in ctx.calibration_batches()]
    if len(batches) < 2:
        raise ConfigError(
            f"method.procedure={who} searches on the calibration batches and holds some out: it needs "
            f"train.init_batches >= 2 (got {len(batches)} batch(es))"
        )
    held_out = min(len(batches) - 1, max(1, math.floor(val_fraction * len(batches) + 0.5)))
    return batches[:-held_out], batches[-held_out:]


class Cycle:
    """An endless walk over a list of batches that remembers its place (the authors' ``itertools.cycle``)."""

    def __init__(self, items: list):
        self.items, self.position = items, 0

    def take(self, count: int) -> list:
        out = [self.items[(self.position + i) % len(self.items)] for i in range(count)]
        self.position += count
        return out


def gate_gradient(
    model: nn.Module, hooks: GateHooks, gates_of: Callable[[torch.Tensor], torch.Tensor], param, batches
) -> tuple[torch.Tensor, list[float]]:
    """(sum_b dL_b / d param, the losses L_b) with the gates g = gates_of(param) in the forward and
    every weight held fixed (first order). ``backward`` rather than ``autograd.grad`` (the latter
    refuses reentrant gradient checkpointing); the gradients it leaves on the weights are dropped."""
    weights = [p for p in model.parameters() if p.requires_grad]
    param.grad, losses = None, []
    for batch in batches:
        hooks.values = gates_of(param)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    hooks.values = None
    for p in weights:
        p.grad = None
    total = param.grad if param.grad is not None else torch.zeros_like(param)
    param.grad = None
    return total, losses


def unrolled_hypergradient(
    train_loss: Callable[[list[torch.Tensor]], torch.Tensor],
    val_losses: list[Callable[[list[torch.Tensor]], torch.Tensor]],
    theta: list[torch.Tensor],
    alpha: torch.Tensor,
    lr: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """d/d alpha sum_v L_v(theta - lr grad_theta L_train(theta, alpha), alpha): the hypergradient
    through one SGD step of the weights, its dependence on alpha included (reverse-mode unrolled
    differentiation over one step, the second-order form of DARTS). ``train_loss(theta)`` and each
    ``val_losses[v](weights)`` evaluate with alpha in their graph. Returns it and the gradient of
    the training loss (detached) that the step took."""
    grads = torch.autograd.grad(train_loss(theta), theta, create_graph=True)
    stepped = [p - lr * g for p, g in zip(theta, grads)]
    total = torch.zeros_like(alpha)
    for val_loss in val_losses:
        (g_alpha,) = torch.autograd.grad(val_loss(stepped), alpha, retain_graph=True)
        total = total + g_alpha
    return total, [g.detach() for g in grads]


def clip_(tensors: list[torch.Tensor], max_norm: float) -> None:
    """Scale gradients in place by min(1, max_norm / (||g|| + 1e-6)) (torch's clip_grad_norm_ formula)."""
    grads = [g for g in tensors if g is not None]
    if not grads:
        return
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, ascending; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[: max(0, k)])


def snapshot(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Every trainable tensor and a copy of its value (LoRA factors and a task head)."""
    return [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def finish(model: nn.Module, candidates: list[Candidate], kept: list[int], restore=None, scale_kept=None) -> None:
    """After the search: restore the snapshot ``restore`` (a restart) or fold the gates ``scale_kept``
    (kept index -> g) into B (weight sharing: the kept Delta W is the one the search ended with);
    then B = 0 and no gradient for every candidate not kept."""
    if restore is not None:
        for p, value in restore:
            p.copy_(value)
    for i, c in enumerate(candidates):
        if i in kept and scale_kept is not None:
            c.lora_b.mul_(scale_kept[i])
        elif i not in kept:
            c.lora_b.zero_()
            c.lora_a.requires_grad_(False)
            c.lora_b.requires_grad_(False)
    for p in model.parameters():
        p.grad = None


@contextmanager
def search_mode(model: nn.Module) -> Iterator[None]:
    """A fork of the RNG (the run afterwards draws as a plain LoRA run would) and the model's train /
    eval mode as it was."""
    device = next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            model.train(was_training)


@dataclass
class SearchCost:
    steps: int = 0
    seconds: float = 0.0
    train_batches: int = 0
    val_batches: int = 0
    val_forwards: int = 0  # validation forward passes the gate steps took
    started: float = field(default_factory=time.perf_counter, repr=False)

    def done(self) -> dict:
        self.seconds = time.perf_counter() - self.started
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "train_batches": self.train_batches,
            "val_batches": self.val_batches,
            "val_forwards": self.val_forwards,
        }


def cosine_lr(lr: float, t: int, total: int) -> float:
    """lr (1 + cos(pi t / T)) / 2 for step t = 0..T-1 (transformers' cosine schedule, no warm-up)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * t / max(total, 1)))


# -- closed-form trainable counts (on the base model, before the adapter) -----------------------------
def candidate_sizes(base_model: nn.Module, ctx: MethodContext, rank: int) -> list[tuple[int | None, int]]:
    """(transformer layer or None, r (d_in + d_out)) of every target linear, in model order."""
    _, block_of = block_index(base_model)
    modules = {f"{n}.weight": m for n, m in base_model.named_modules()}
    out = []
    for name, w in target_linear_weights(base_model, ctx.target_modules):
        d_out, d_in = w.shape
        out.append((block_of.get(id(modules[name])), rank * (d_out + d_in)))
    return out


def kept_count(sizes: list[int], k: int, base_model: nn.Module, ctx: MethodContext) -> int | None:
    """k units' LoRA plus the task head when every unit has the same size (then it does not matter
    which k win); None otherwise."""
    if not sizes or len(set(sizes)) != 1:
        return None
    return min(k, len(sizes)) * sizes[0] + head_parameter_count(base_model, ctx.head)


def check_same_selection(who: str, what: str, ours: list, saved: list) -> None:
    """On resume the rebuilt run searched again (deterministically): it must have kept what the
    checkpoint's run kept, else the calibration data or the model differ."""
    if list(saved) != list(ours):
        raise RuntimeError(
            f"{who}: the search of the resumed run kept {what} {ours}, the checkpoint's kept {saved}; the "
            "calibration data or the model differ from the original run"
        )
