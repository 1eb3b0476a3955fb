"""One classification head per task (task-incremental learning), the adapter or weights shared.

The model's head module (``classifier`` or ``score``, lorabench.methods.base.HEAD_MODULES) is
replaced, before the method is applied, by :class:`TaskHeads`: ``n`` copies of the freshly
initialised head (identical at the start) and a :class:`HeadSelector` that says which head each
example goes through. Every copy trains under every method (peft's ``modules_to_save``, our own
adapters' head rule and full fine-tuning all train ``classifier.*``), but a head receives gradient
only from the examples routed to it: the current task's, and a replayed task's examples its own.

Why per-task heads: the GLUE tasks here all have two labels, but their label ids mean different
things (SST-2 1 = positive, RTE 1 = not_entailment), so one shared head is overwritten by every
new task and its "forgetting" would be mostly a relabelling. With a head per task (the task is known
at test time, as in Lopez-Paz & Ranzato's and Chaudhry et al.'s multi-head protocols) what the
accuracy matrix measures is the forgetting of the shared representation, i.e. of the method.

The selector is shared by every copy of the module (peft deep-copies the head into
``modules_to_save``): ``active`` routes a whole batch (evaluation, single-task training), ``task_ids``
(one id per row) a batch that mixes tasks (replay). Causal-LM tasks keep their one LM head.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorabench.methods.base import HEAD_MODULES


class HeadSelector:
    """Which head the next forward uses: ``task_ids`` (a 1-D tensor, one id per row) when set, else
    ``active``. Deep copies return the same selector, so every copy of :class:`TaskHeads` shares it."""

    def __init__(self) -> None:
        self.active = 0
        self.task_ids: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> "HeadSelector":
        return self


class TaskHeads(nn.Module):
    """``n`` copies of a head module; each row of the input goes through its task's copy."""

    def __init__(self, head: nn.Module, n: int, selector: HeadSelector):
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in range(n))
        self.selector = selector

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ids = self.selector.task_ids
        if ids is None or ids.shape[0] != x.shape[0]:
            return self.heads[self.selector.active](x, *args, **kwargs)
        ids = ids.to(x.device)
        present = torch.unique(ids).tolist()
        if len(present) == 1:
            return self.heads[present[0]](x, *args, **kwargs)
        out = None
        for task in present:
            rows = (ids == task).nonzero(as_tuple=True)[0]
            part = self.heads[task](x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out


def install_task_heads(model: nn.Module, n: int) -> HeadSelector:
    """Replace the model's head module by :class:`TaskHeads` of ``n`` copies; the selector routes them.
    Raises ValueError when the model has no head module named in HEAD_MODULES."""
    for name in HEAD_MODULES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            selector = HeadSelector()
            setattr(model, name, TaskHeads(head, n, selector))
            return selector
    raise ValueError(f"the model has no classification head module named {' or '.join(HEAD_MODULES)}")
