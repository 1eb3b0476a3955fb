"""DyLoRA's rank sampling (Valipour et al., 2023, arXiv:2210.07558), run from the training loop.

Before every optimizer step one rank b ~ U{r_min..r_max} is drawn (a generator seeded from the run
seed) and set on every ``dylora`` layer: the first step's rank in ``setup``, the next one in
``on_step_end``. With ``frozen: true`` (the default: the authors' GLUE scripts call
``set_rank(b - 1, frozen=True)`` every step) ``after_backward`` zeroes the gradients of ranks < b, so
that only row b of A and column b of B receive gradient. This is what the authors' frozen mode
computes: their forward detaches ranks < b, which leaves the same gradients (zero for ranks < b and
> b) and still lets the optimizer move the lower ranks through Adam's moments and weight decay; the
zeroing happens before gradient clipping, as the detach does. With ``frozen: false`` every rank <= b
trains. ``state()`` reports how often each rank was drawn; ``state_dict()`` (checkpoints) holds the
generator state, the current rank and the counts. With ``eval_all_ranks: true`` the loop evaluates the
trained model at every rank 1..r_max after training and stores the rank -> metric curve in the record
(the authors' per-rank evaluation).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.method_params.procedures import DyLoraSamplingParams
from lorabench.methods.adapters.dylora import DyLoraLayer
from lorabench.methods.base import MethodContext, Procedure
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import PROCEDURES


@PROCEDURES.register("dylora")
class DyLoraSampling(Procedure):
    Params = DyLoraSamplingParams
    paper = "Valipour et al., 2023, arXiv:2210.07558"
    fidelity = Fidelity(
        reference="huawei-noah/Efficient-NLP@bb44348bc897 DyLoRA (run_glue.py callback, loralib/DyLoRA.py dynamic)",
        status="parity",
        tolerance="max |Δ| / max(1, |ref|) <= 1e-6 of outputs, gradients, A and B over 12 steps (fp32, CPU), frozen"
        " and unfrozen modes",
        fixture="tests/fixtures/parity/dylora.json",
        deviations=(
            "b is drawn from a generator of the procedure's own (seeded from the run seed) rather than torch's"
            " global generator, so runs do not depend on what else consumed global random numbers",
            "evaluation during and after training uses the layers' eval_rank (r_max unless set); the authors'"
            " Trainer evaluates at whatever rank the last step drew (their per-rank evaluation is eval_all_ranks)",
        ),
        unchecked=("the parity case feeds the reference's rank sequence to ours; the draws themselves differ",),
        revision=2,  # frozen now defaults to true
    )
    requires_adapter = ("dylora",)

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: DyLoraSamplingParams, ctx: MethodContext
    ) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, DyLoraLayer)]
        if not self.layers:
            raise ValueError("the dylora procedure found no DyLoRA layers")
        self.frozen, self.eval_all_ranks = params.frozen, params.eval_all_ranks
        self.r_min, self.r_max = self.layers[0].r_min, self.layers[0].r_max
        self.generator = torch.Generator().manual_seed(ctx.seed + 7919)
        self.counts: dict[int, int] = {}
        self._sample()

    def _sample(self) -> None:
        self.rank = int(torch.randint(self.r_min, self.r_max + 1, (1,), generator=self.generator))
        for layer in self.layers:
            layer.train_rank = self.rank

    def after_backward(self, step: int) -> None:
        self.counts[self.rank] = self.counts.get(self.rank, 0) + 1
        if self.frozen and self.rank > 1:
            for layer in self.layers:
                if layer.lora_A.grad is not None:
                    layer.lora_A.grad[: self.rank - 1].zero_()
                if layer.lora_B.grad is not None:
                    layer.lora_B.grad[:, : self.rank - 1].zero_()

    def on_step_end(self, step: int) -> None:
        self._sample()

    def post_training_evaluations(self, evaluate) -> dict[int, dict] | None:
        """With ``eval_all_ranks``: the metrics of ``evaluate()`` at every rank 1..r_max (one trained
        model, truncated to the first b ranks), as DyLoRA's rank curves; the eval rank is restored."""
        if not self.eval_all_ranks:
            return None
        kept = [layer.eval_rank for layer in self.layers]
        curve = {}
        for rank in range(1, self.r_max + 1):
            for layer in self.layers:
                layer.eval_rank = rank
            curve[rank] = evaluate()
        for layer, rank in zip(self.layers, kept):
            layer.eval_rank = rank
        return curve

    def state(self) -> dict:
        return {"dylora_rank_counts": dict(sorted(self.counts.items())), "dylora_eval_rank": self.layers[0].eval_rank}

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state().tolist(),
            "rank": self.rank,
            "counts": {str(k): v for k, v in self.counts.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.counts = {int(k): v for k, v in state["counts"].items()}
        self.rank = int(state["rank"])
        for layer in self.layers:
            layer.train_rank = self.rank
