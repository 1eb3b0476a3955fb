"""Continual-learning strategies (``protocol.continual.strategy``): what a stage adds to plain
training. Importing this module does not import torch (config validation reads ``STRATEGIES``).

* ``sequential``: plain sequential fine-tuning with the run's method, one task after another (the
  lower bound every continual method is compared with).
* ``replay``: experience replay (Chaudhry et al., 2019, arXiv:1902.10486): ``replay_size`` examples
  of each finished task are kept and mixed into every later micro-batch at ``replay_ratio``
  (lorabench.protocols.continual.batches).
* ``ilora``: I-LoRA (Ren et al., 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter
  Efficient Tuning", arXiv:2402.18865; lorabench.protocols.continual.ilora): replay as above, a slow
  EMA copy of the adapter, a fast/slow consistency loss on the replayed rows, evaluation with the
  slow weights. Needs an adapter method.

A strategy's hooks, called by lorabench.protocols.continual.protocol: ``setup(run, selector)`` once
the method is applied; ``on_batch`` for every training micro-batch; ``extra_loss(model)`` after
its forward (the loop adds it before backward); ``on_step_end(stage_step)`` after each optimizer
step; ``evaluation_weights(run)`` around the evaluations; ``finish(run)`` before the record is
finished; ``tensors``/``load_tensors`` and ``state_dict``/``load_state_dict`` for the stage
checkpoint; ``report()`` for the record.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lorabench.config import ContinualConfig
from lorabench.registry import Registry

STRATEGIES: Registry = Registry("continual strategy")


@STRATEGIES.register("sequential")
class Sequential:
    """Plain sequential fine-tuning: no replay, no extra loss, the trained weights evaluated."""

    replays = False  # keeps a replay buffer and mixes it into the batches
    needs_adapter = False

    def __init__(self, settings: ContinualConfig):
        self.settings = settings

    def setup(self, run, selector) -> None:
        return None

    def on_batch(self, batch: dict, task_ids, replay_rows: list[int]) -> None:
        return None

    def extra_loss(self, model) -> Any:
        return None

    def on_step_end(self, stage_step: int) -> None:
        return None

    def evaluation_weights(self, run):
        return contextlib.nullcontext()

    def finish(self, run) -> None:
        return None

    def tensors(self) -> dict:
        return {}

    def load_tensors(self, tensors: dict, device) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def report(self) -> dict:
        return {}


@STRATEGIES.register("replay")
class Replay(Sequential):
    """Experience replay: the batches mix in the finished tasks' buffers; nothing else changes."""

    replays = True

    def report(self) -> dict:
        return {"replay_size": self.settings.replay_size, "replay_ratio": self.settings.replay_ratio}


@STRATEGIES.register("ilora")
class ILoRAStrategy(Replay):
    """I-LoRA; the rules and what they were taken from: lorabench.protocols.continual.ilora."""

    needs_adapter = True

    def __init__(self, settings: ContinualConfig):
        super().__init__(settings)
        from lorabench.protocols.continual.ilora import ILoRA

        self.impl = ILoRA(settings.ema_decay, settings.consistency_weight)

    def setup(self, run, selector) -> None:
        self.impl.setup(run.accelerator.unwrap_model(run.model), selector)

    def on_batch(self, batch: dict, task_ids, replay_rows: list[int]) -> None:
        self.impl.on_batch(batch, task_ids, replay_rows)

    def extra_loss(self, model) -> Any:
        return self.impl.consistency()

    def on_step_end(self, stage_step: int) -> None:
        self.impl.ema_update()

    def evaluation_weights(self, run):
        return self.impl.slow_weights()

    def finish(self, run) -> None:
        self.impl.keep_slow()

    def tensors(self) -> dict:
        return self.impl.slow_tensors()

    def load_tensors(self, tensors: dict, device) -> None:
        self.impl.load_slow(tensors, device)

    def state_dict(self) -> dict:
        return {"last_consistency": self.impl.last_consistency}

    def load_state_dict(self, state: dict) -> None:
        self.impl.last_consistency = state.get("last_consistency")

    def report(self) -> dict:
        return {
            **super().report(),
            "ema_decay": self.settings.ema_decay,
            "consistency_weight": self.settings.consistency_weight,
            "evaluated_with": "slow (EMA) weights",
            "slow_tensors": len(self.impl.slow),
            "last_consistency_loss": self.impl.last_consistency,
            "fidelity": self._fidelity(),
        }

    @staticmethod
    def _fidelity() -> dict:
        from lorabench.protocols.continual.ilora import FIDELITY

        return FIDELITY.describe()
