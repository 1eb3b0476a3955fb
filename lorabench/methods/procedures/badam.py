"""BAdam (Luo et al., 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for Large
Language Models", NeurIPS 2024, arXiv:2404.02827), with adapter none and AdamW.

Block coordinate descent: partition the parameters into blocks π_1..π_D; in each block-epoch visit
every block once (order ``switch_mode``) and run K = ``switch_every`` Adam steps on the active
block only, θ_{π_i} <- Adam(θ_{π_i}; ∇_{π_i} L), all other blocks frozen. On a switch, the old
block's Adam state (moments and step) is deleted, so optimizer memory is the active block's share
and each visit starts fresh moments (the authors' BlockOptimizer clears the base optimizer's state
on every switch).
Blocks: one per transformer layer (the layer list is found as in LISA). Non-layer parameters
(``badam_non_layer``): ``blocks`` (default, the authors' automatic partition: the embeddings form one
block, every other non-layer parameter - final norm, pooler, LM/task head - one more block, order
embeddings, layer 0..L-1, rest) or ``always`` (non-layer parameters train every step and keep their
Adam state across switches, like LISA - the authors' ``active_modules`` also train every step but
lose their state at each switch; an option for classification, whose randomly initialised head
otherwise trains 1/D of the time).
Embeddings are the non-layer parameters whose name contains "embed".
Hyper-parameters: K = ``switch_every`` (authors' README and LLaMA-Factory ``badam_switch_interval``:
50; the BlockOptimizer class default is 10), ``switch_mode`` ascending | descending | random
(random reshuffling of the order every block-epoch; README and LLaMA-Factory default: ascending),
seeded by ``seed``. lr as full fine-tuning (LLaMA-Factory's BAdam example: 5e-5 on Llama-2-7B).
Multi-process runs: changing ``requires_grad`` under DDP needs ``find_unused_parameters``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import check_choice, check_positive
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.procedures.lisa import set_trainable, transformer_layers
from lorabench.registry import PROCEDURES

SWITCH_MODES = ("ascending", "descending", "random")
NON_LAYER = ("blocks", "always")


def badam_blocks(model: nn.Module, non_layer: str) -> tuple[list[tuple[str, list[nn.Parameter]]], list[nn.Parameter]]:
    """(label, params) per block in ascending order, and the parameters that always train."""
    prefix, layers = transformer_layers(model)
    blocks = [(f"{prefix}.{i}", list(layer.parameters())) for i, layer in enumerate(layers)]
    inside = {id(p) for _, ps in blocks for p in ps}
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in inside]
    if non_layer == "always":
        return blocks, [p for _, p in outside]
    embed = [p for n, p in outside if "embed" in n]
    rest = [p for n, p in outside if "embed" not in n]
    blocks = ([("embeddings", embed)] if embed else []) + blocks + ([("rest", rest)] if rest else [])
    return blocks, []


@dataclass
class BAdamParams:
    switch_every: int = 50  # K: Adam steps per active block
    switch_mode: str = "ascending"  # block order in each block-epoch
    badam_non_layer: str = "blocks"  # blocks: embeddings + rest are blocks too; always: they always train

    def __post_init__(self) -> None:
        check_positive("method.switch_every", self.switch_every)
        check_choice("method.switch_mode", self.switch_mode, SWITCH_MODES)
        check_choice("method.badam_non_layer", self.badam_non_layer, NON_LAYER)


@PROCEDURES.register("badam")
class BAdam(Procedure):
    Params = BAdamParams
    paper = "Luo et al., 2024, arXiv:2404.02827"
    backed_by = "lorabench"
    requires_adapter = ("none",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: BAdamParams, ctx: MethodContext
    ) -> None:
        self.blocks, self.always = badam_blocks(model, params.badam_non_layer)
        self.optimizer, self.params, self.max_steps = optimizer, params, ctx.max_steps
        self.rng = random.Random(ctx.seed)
        self.queue: list[int] = []
        self.periods: list[dict] = []
        self.active: int | None = None
        for _, ps in self.blocks:
            set_trainable(ps, False, optimizer)
        set_trainable(self.always, True, optimizer)
        self._switch(0)

    def _next_block(self) -> int:
        if not self.queue:
            order = list(range(len(self.blocks)))
            if self.params.switch_mode == "descending":
                order.reverse()
            elif self.params.switch_mode == "random":
                self.rng.shuffle(order)
            self.queue = order
        return self.queue.pop(0)

    def _switch(self, step: int) -> None:
        new = self._next_block()
        if self.active is not None:
            set_trainable(self.blocks[self.active][1], False, self.optimizer)
        set_trainable(self.blocks[new][1], True, self.optimizer)
        self.active = new
        self.periods.append({"start_step": step, "block": self.blocks[new][0]})

    def on_step_end(self, step: int) -> None:
        if step % self.params.switch_every == 0 and step < self.max_steps:  # no switch after the last step
            self._switch(step)

    def expected_trainable(self, base_model: nn.Module, params: BAdamParams, ctx: MethodContext) -> int:
        """Trainable parameters in the first period: the first block of the order plus the always set."""
        blocks, always = badam_blocks(base_model, params.badam_non_layer)
        first = {"ascending": 0, "descending": len(blocks) - 1}.get(params.switch_mode)
        if first is None:  # random: depends on the seed
            order = list(range(len(blocks)))
            random.Random(ctx.seed).shuffle(order)  # the same first draw as _next_block
            first = order[0]
        return sum(p.numel() for p in always) + sum(p.numel() for p in blocks[first][1])

    def state(self) -> dict:
        return {"badam_blocks": [label for label, _ in self.blocks], "badam_periods": self.periods}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "queue": self.queue, "active": self.active, "periods": self.periods}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.queue, self.periods, self.active = list(state["queue"]), list(state["periods"]), state["active"]
        for i, (_, params) in enumerate(self.blocks):
            set_trainable(params, i == self.active, self.optimizer)
