"""BAdam (Luo et al., 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for Large
Language Models", NeurIPS 2024, arXiv:2404.02827), with adapter none and AdamW.

Block coordinate descent: partition the transformer's parameters into blocks π_1..π_D; visit the
blocks in the order ``switch_mode`` and run Adam on the active block only,
θ_{π_i} <- Adam(θ_{π_i}; ∇_{π_i} L), every other block frozen. At each switch the whole Adam state
(moments and step counts) is dropped, so every visit starts from fresh moments and optimizer memory
is that of the active set.

Schedule (as the authors' ``BlockOptimizer``): after optimizer step g (g = 1, 2, ...) the next block
becomes active when (g + 1) mod K = 0, K = ``switch_every``; the first block therefore gets K - 1
steps and every later visit K (K = 1: one step each). Order: ``ascending`` (0, 1, .., D-1, 0, ..),
``descending`` (D-1, .., 0, D-1, ..) or ``random`` (a fresh permutation every block-epoch:
``torch.randperm(D)`` from a generator seeded with ``seed``, taken from its end, as the reference
draws it from torch's global generator).

Blocks: one per transformer layer (the layer list is found as in LISA), the authors' automatic
partition (``model.layers.N.``; their SuperGLUE script lists ``encoder.layer.N.`` the same way).
Parameters outside the layers (``badam_non_layer``):
  * ``frozen``: never train (the reference's default, ``include_embedding`` and ``include_lm_head``
    off, no ``active_modules``: a causal LM keeps its pretrained embeddings, final norm and LM head);
  * ``active``: the embeddings stay frozen, every other non-layer tensor (pooler, final norm, task head)
    trains at every step beside the active block and loses its Adam state at each switch like it (the
    authors' README: list a randomly initialised head in ``active_modules``, as their SuperGLUE runs do
    with the pooler and task head);
  * ``blocks``: the embeddings form a first block and the other non-layer tensors a last one (the
    reference's ``include_embedding=True, include_lm_head=True``);
  * ``auto`` (default): ``active`` for classification, ``frozen`` for causal LMs.
Embeddings are the non-layer parameters whose name contains "embed" (the reference's pattern).
Hyper-parameters: K = ``switch_every`` (the BlockOptimizer default and LLaMA-Factory's
``badam_switch_interval``: 50; the README suggests min(max(n / (B D), 50), 100)), ``switch_mode``
(LLaMA-Factory's default and the authors' SuperGLUE command: ascending; the class default is
descending). lr as full fine-tuning (LLaMA-Factory's BAdam example: 5e-5 on Llama-2-7B).

Deliberate deviation: weight decay follows the project's groups (none on biases and norms). The
reference rebuilds its groups from the wrapped optimizer's constructor defaults, which overwrite the
no-decay group's 0.0, so it decays every active tensor at that default (0.01 for an AdamW built as
the HF Trainer builds it). Multi-process runs: DDP's reducer is built once for the parameters that
require gradients, so a block switch breaks it (refused at validation); FSDP2 follows the switch (the
blocks are looked up in the model at every switch, since FSDP2 replaces the parameter objects).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.procedures import BAdamParams
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.procedures.lisa import set_trainable, transformer_layers
from lorabench.registry import PROCEDURES


def non_layer_mode(non_layer: str, head: str) -> str:
    """``auto`` resolved by the head: a classifier's head trains throughout, a causal LM's stays frozen."""
    if non_layer == "auto":
        return "active" if head == "classification" else "frozen"
    return non_layer


def badam_blocks(
    model: nn.Module, non_layer: str, head: str
) -> tuple[list[tuple[str, list[nn.Parameter]]], list[nn.Parameter]]:
    """(label, params) per block in ascending order, and the parameters that train at every step."""
    prefix, layers = transformer_layers(model)
    blocks = [(f"{prefix}.{i}", list(layer.parameters())) for i, layer in enumerate(layers)]
    inside = {id(p) for _, ps in blocks for p in ps}
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in inside]
    embed = [p for n, p in outside if "embed" in n]
    rest = [p for n, p in outside if "embed" not in n]
    mode = non_layer_mode(non_layer, head)
    if mode == "blocks":
        return ([("embeddings", embed)] if embed else []) + blocks + ([("rest", rest)] if rest else []), []
    return blocks, rest if mode == "active" else []


def first_block(num_blocks: int, mode: str, generator: torch.Generator) -> tuple[int, list[int], int]:
    """(first block, the rest of its block-epoch's order, permutations drawn)."""
    if mode == "ascending":
        return 0, [], 0
    if mode == "descending":
        return num_blocks - 1, [], 0
    order = torch.randperm(num_blocks, generator=generator).tolist()
    return order.pop(), order, 1


@PROCEDURES.register("badam")
class BAdam(Procedure):
    Params = BAdamParams
    paper = "Luo et al., 2024, arXiv:2404.02827"
    backed_by = "lorabench"
    requires_adapter = ("none",)
    moves_trainable_set = True  # layers trained earlier are frozen later: checkpoints keep every weight
    fidelity = Fidelity(
        reference="pip badam==1.4 (= Ledzy/BAdam@bf989dcb8c1a src/badam/block_optim.py, BlockOptimizer)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12-160 steps (fp32, CPU); trainable sets, Adam-state sizes equal per step",
        fixture="tests/fixtures/parity/badam.json",
        deviations=(
            "weight decay follows the project's groups (none on 1-D tensors): the reference's rebuilt groups take"
            " the wrapped optimizer's constructor weight decay for every active tensor (its no-decay group is"
            " overwritten by the defaults), 0.01 for an AdamW built as the HF Trainer builds it",
            "classification trains the non-layer, non-embedding tensors (pooler, final norm, head) at every step"
            " (the authors' README for a randomly initialised head, their SuperGLUE active_modules); the"
            " library's automatic partition alone would leave the head frozen",
            "switch_mode defaults to ascending (LLaMA-Factory, the authors' SuperGLUE command) rather than the"
            " class default descending",
            "the transformer layers are found as the largest nn.ModuleList rather than by the name pattern"
            " 'layers.', so BERT-style 'encoder.layer.N' models get the per-layer blocks the authors list by hand",
        ),
        unchecked=(
            "the fp32 master copy of a half-precision active block (lorabench trains fp32 weights, where the copy"
            " is the weights themselves)",
            "DeepSpeed ZeRO-3, LoRA mode, BlockOptimizerRatio; switch_mode 'fixed' and start_block are not exposed",
        ),
        revision=2,  # default partition (head active, embeddings frozen) and the K - 1 first visit changed
    )

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: BAdamParams, ctx: MethodContext
    ) -> None:
        self.model, self.head = model, ctx.head
        self.blocks, self.always = badam_blocks(model, params.badam_non_layer, ctx.head)
        self.mode = non_layer_mode(params.badam_non_layer, ctx.head)
        self.optimizer, self.params, self.max_steps, self.seed = optimizer, params, ctx.max_steps, ctx.seed
        self.generator = torch.Generator().manual_seed(ctx.seed)
        set_trainable(list(model.parameters()), False)
        set_trainable(self.always, True)
        self.active, self.order, self.permutations = first_block(len(self.blocks), params.switch_mode, self.generator)
        set_trainable(self.blocks[self.active][1], True)
        self.optimizer.state.clear()
        self.periods: list[dict] = [{"start_step": 0, "block": self.blocks[self.active][0]}]

    def _next_block(self) -> int:
        count = len(self.blocks)
        if self.params.switch_mode == "ascending":
            return (self.active + 1) % count
        if self.params.switch_mode == "descending":
            return (self.active - 1) % count
        if not self.order:
            self.order = torch.randperm(count, generator=self.generator).tolist()
            self.permutations += 1
        return self.order.pop()

    def _switch(self, step: int) -> None:
        # the blocks are looked up again: a wrapper applied after setup (FSDP2) replaces the parameter objects
        self.blocks, _ = badam_blocks(self.model, self.params.badam_non_layer, self.head)
        new = self._next_block()
        set_trainable(self.blocks[self.active][1], False)
        set_trainable(self.blocks[new][1], True)
        self.optimizer.state.clear()  # fresh moments and step counts for the block and the active modules
        self.active = new
        self.periods.append({"start_step": step, "block": self.blocks[new][0]})

    def on_step_end(self, step: int) -> None:
        if (step + 1) % self.params.switch_every == 0 and step < self.max_steps:  # no switch after the last step
            self._switch(step)

    def expected_trainable(self, base_model: nn.Module, params: BAdamParams, ctx: MethodContext) -> int:
        """Trainable parameters in the first period: the first block of the order plus the active modules."""
        blocks, always = badam_blocks(base_model, params.badam_non_layer, ctx.head)
        first, _, _ = first_block(len(blocks), params.switch_mode, torch.Generator().manual_seed(ctx.seed))
        return sum(p.numel() for p in always) + sum(p.numel() for p in blocks[first][1])

    def state(self) -> dict:
        return {
            "badam_blocks": [label for label, _ in self.blocks],
            "badam_non_layer": self.mode,
            "badam_active_modules": sum(p.numel() for p in self.always),
            "badam_periods": self.periods,
        }

    def state_dict(self) -> dict:
        return {"active": self.active, "order": self.order, "permutations": self.permutations, "periods": self.periods}

    def load_state_dict(self, state: dict) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        for _ in range(state["permutations"]):  # replay the permutations drawn so far
            torch.randperm(len(self.blocks), generator=self.generator)
        self.permutations, self.order = state["permutations"], list(state["order"])
        self.active, self.periods = state["active"], list(state["periods"])
        for i, (_, params) in enumerate(self.blocks):
            set_trainable(params, i == self.active)
