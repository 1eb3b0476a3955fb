"""AdaLoRA's rank allocator (Zhang et al., 2023, arXiv:2303.10512), run from the training loop.

peft's ``AdaLoraModel.update_and_allocate(global_step)`` needs the gradients (importance =
|w * grad|), so it runs in ``after_backward``; peft's own examples call it after
``optimizer.step()``, so ``on_step_end`` re-applies the current rank mask to keep the pruned
triplets at exactly zero after the optimizer has moved them. ``global_step`` is the 1-based number
of the optimizer step being taken, so the final allocation fires at total_step - tfinal even when
tfinal = 0. The schedule (init_r, target_r, tinit, tfinal, deltaT) lives in the ``adalora``
adapter's parameters. ``state()`` reports the effective rank of every adapted layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.methods.base import MethodContext, Procedure
from lorabench.registry import PROCEDURES


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """Non-zero singular values (entries of lora_E) per adapted layer."""
    return {
        name.rsplit(".lora_E", 1)[0].removeprefix("base_model.model."): int(torch.count_nonzero(p).item())
        for name, p in model.named_parameters()
        if ".lora_E." in name
    }


@PROCEDURES.register("adalora")
class AdaLoraAllocator(Procedure):
    paper = "Zhang et al., 2023, arXiv:2303.10512"
    backed_by = "peft"
    requires_adapter = ("adalora",)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, params, ctx: MethodContext) -> None:
        self.model = model
        self.tuner = model.base_model  # peft's AdaLoraModel
        self.calls = 0

    def after_backward(self, step: int) -> None:
        self.tuner.update_and_allocate(step + 1)
        self.calls += 1

    def on_step_end(self, step: int) -> None:
        pattern = self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern
        if pattern:
            self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, pattern)

    def state(self) -> dict:
        return {"adalora_ranks": effective_ranks(self.model), "adalora_allocator_calls": self.calls}

    def state_dict(self) -> dict:
        """The rank mask and the call count. The importance EMAs (one value per LoRA weight) are
        not saved: after a resume they restart and re-converge within ~1 / (1 - beta) steps."""
        pattern = self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern
        return {"rank_pattern": {k: [bool(x) for x in v] for k, v in (pattern or {}).items()}, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))
        pattern = state.get("rank_pattern") or None
        self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern = pattern
        if pattern:
            self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, pattern)
