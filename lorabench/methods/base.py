"""The contracts of the five method axes and the context they receive.

A published method is a combination of components (DESIGN.md): an adapter (what trains), an
initializer (how the adapter starts), an optimizer (how gradients become updates), a procedure
(what trains when) and a regularizer (what the loss adds and what happens around a step's forward
and backward). Each component is a class registered under a name, with a ``Params`` dataclass
that declares its hyper-parameters and their defaults (the papers' where there are any; the
dataclasses live in lorabench/method_params/, torch-free, registered there by name too), and class
attributes ``paper`` (citation) and ``backed_by`` (``peft``, ``transformers``, ``galore-torch``,
``torch`` or ``lorabench``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lorabench.method_params.registry import NoParams


@dataclass
class MethodContext:
    """What components may look at while they build. ``calibration_batches()`` yields a few real
    training batches (the first ``train.init_batches`` in dataset order, the same for every seed) for
    data- and gradient-driven inits."""

    target_modules: list[str]
    head: str  # "classification" or "causal_lm"
    lr: float
    weight_decay: float
    max_steps: int
    seed: int
    calibration_batches: Callable[[], Iterator[dict[str, torch.Tensor]]] = lambda: iter(())
    calibration_key: str = ""  # identifies model, data and calibration batches (not the seed), for caches
    extras: dict[str, Any] = field(default_factory=dict)  # things a component reports to the record
    tokenizer: Any = None  # the run's tokenizer (text-driven components: AlignGuard's alignment texts)


class Adapter:
    """Wraps target modules of a model; afterwards only the parameters meant to train require grad."""

    Params: type = NoParams
    paper: str = ""
    backed_by: str = "lorabench"

    def apply(self, model: nn.Module, params: Any, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        raise NotImplementedError


class Initializer:
    """Changes how an adapter starts. ``adapter_kwargs`` feed the adapter's constructor (e.g. peft's
    ``init_lora_weights``); ``before_adapter`` / ``after_adapter`` may look at calibration batches."""

    Params: type = NoParams
    paper: str = ""
    backed_by: str = "lorabench"

    def adapter_kwargs(self, params: Any) -> dict:
        return {}

    def check_backend(self, params: Any) -> None:
        """A check of ``params`` that needs torch (the ``Params`` checks cannot: they run before torch
        loads), e.g. that CUDA is there; ``resolve_method`` calls it. Raises ``ConfigError``."""
        return None

    def before_adapter(self, model: nn.Module, params: Any, ctx: MethodContext) -> None:
        return None

    def after_adapter(self, model: nn.Module, params: Any, ctx: MethodContext) -> None:
        return None


class OptimizerBuilder:
    """Builds the optimizer over the model's trainable parameters."""

    Params: type = NoParams
    paper: str = ""
    backed_by: str = "torch"

    def build(self, model: nn.Module, params: Any, ctx: MethodContext) -> torch.optim.Optimizer:
        raise NotImplementedError


class Stateful:
    """What a procedure or a regularizer keeps across steps: ``state()`` for the run record (e.g. the
    layers it sampled), ``state_dict()`` / ``load_state_dict()`` for checkpoints (a procedure's is
    written as JSON, a regularizer's with torch.save)."""

    def state(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class Procedure(Stateful):
    """Changes what trains when. The loop calls the hooks at the named points. A procedure that
    freezes tensors it trained earlier sets ``moves_trainable_set`` so checkpoints keep every weight."""

    Params: type = NoParams
    paper: str = ""
    backed_by: str = "lorabench"
    moves_trainable_set: bool = False

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: Any, ctx: MethodContext) -> None:
        return None

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term the loop adds to every micro-batch's loss before backward (a regulariser such as
        SoRA's L1 on its gates): it enters the gradient (and so the clipping); the logged training
        loss stays the model's. None: nothing."""
        return None

    def after_backward(self, step: int) -> None:
        """After the last backward of an optimizer step, before clipping and ``optimizer.step()``."""

    def on_step_end(self, step: int) -> None:
        """After ``optimizer.step()`` and the scheduler step."""


class Regularizer(Stateful):
    """Adds loss terms and acts around a step's forward and backward (the fifth axis). The loop calls,
    per optimizer step: ``before_forward`` (before the first micro-batch's forward: a weight
    perturbation, as SAM-like methods make), then for every micro-batch ``loss_terms`` (named terms
    the loop adds to that micro-batch's loss before backward; each is logged on its own in the train
    log and the tracker, and the logged training loss stays the model's), then ``after_backward``
    (after the last backward, before clipping and ``optimizer.step()``: undo the perturbation), then
    ``on_step_end``. A regulariser whose terms need the model's outputs sets ``needs_outputs``
    (``"logits"`` or ``"hidden_states"``); the loop then runs the model's own forward and passes its
    outputs. One that needs more than one forward and backward per step (SAM-like methods) sets
    ``passes``: the loop runs ``before_forward``, the micro-batches and ``after_backward`` that many
    times on the same micro-batches, with ``pass_index`` 0, 1, ...; the logged loss and terms are the
    first pass's, and the gradients left after the last ``after_backward`` are what the step uses."""

    Params: type = NoParams
    paper: str = ""
    backed_by: str = "lorabench"
    needs_outputs: str | None = None  # None | "logits" | "hidden_states"
    passes: int = 1  # forward-backward passes per optimizer step

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: Any, ctx: MethodContext) -> None:
        return None

    def before_forward(self, model: nn.Module, step: int, pass_index: int = 0) -> None:
        return None

    def loss_terms(self, model: nn.Module, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, model: nn.Module, step: int, pass_index: int = 0) -> None:
        return None

    def on_step_end(self, step: int) -> None:
        return None

    def on_train_end(self, model: nn.Module) -> None:
        """After the final evaluation, before ``state()`` goes to the record (e.g. a drift measured on the
        trained model). ``model`` is the unwrapped trained model."""
        return None


def trainable_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def decay_groups(model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()) -> list[dict]:
    """AdamW param groups: no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in trainable_parameters(model):
        if id(p) in exclude:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def target_linear_weights(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Parameter]]:
    """2-D weights of the linear modules whose name ends with one of ``targets``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found.append((f"{name}.weight", module.weight))
    return found


def rank_limit(model: nn.Module, components, targets: list[str]) -> tuple[int, str, tuple[int, ...]] | None:
    """The largest rank every target accepts when a component declares ``rank_at_most_every_target``
    (its factors are singular vectors of each target's W or gradient, so r <= min(d_out, d_in) / k,
    with k = the component's ``singular_vectors_per_rank``, 2 for LoRA-GA's 2r), with the name and shape
    of the target that sets it; None when no component is bounded or nothing is targeted."""
    bounded = [c for c in components if getattr(c, "rank_at_most_every_target", False)]
    weights = target_linear_weights(model, targets)
    if not bounded or not weights:
        return None
    per_rank = max(getattr(c, "singular_vectors_per_rank", 1) for c in bounded)
    name, weight = min(weights, key=lambda item: min(item[1].shape))
    return min(weight.shape) // per_rank, name, tuple(weight.shape)


HEAD_MODULES = ("classifier", "score")


def head_parameter_count(model: nn.Module, head: str) -> int:
    """Parameters of a freshly initialised classification head (peft trains it in full for SEQ_CLS);
    0 for causal LMs, whose LM head is pretrained and stays frozen."""
    if head != "classification":
        return 0
    return sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] in HEAD_MODULES)
