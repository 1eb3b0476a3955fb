"""The hyper-parameters of the LoRA-placement searches (procedures ``diffora`` and ``flexora``,
lorabench/methods/procedures/diffora.py and flexora.py); torch-free.

Both run on the ``lora`` adapter and declare its ``rank`` too (the same key: a preset and an override
set both at once), because the trainable count after the search, k kept modules of r (d_in + d_out),
needs it. The size knob of a budget is the number of kept modules (DiffoRA) or layers (Flexora).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive, check_range
from lorabench.errors import ConfigError
from lorabench.method_params.registry import params_for

HYPERGRADIENTS = ("first_order", "unrolled")  # flexora: the authors' code | through one SGD step of LoRA


@params_for("procedure", "diffora", requires_adapter=("lora",))
@dataclass
class DifforaParams:
    rank: int = 8  # the lora adapter's rank (same key): sizes the kept modules
    diffora_keep_modules: int = 0  # k: modules that keep LoRA (the size knob); 0: round(keep_ratio x candidates)
    diffora_keep_ratio: float = 0.5  # share of the candidate modules kept when diffora_keep_modules is 0
    diffora_search_epochs: int = 1  # passes over the search's training share (one weight + one gate step per batch)
    diffora_val_fraction: float = 0.5  # calibration batches held out for the gate steps (DARTS: half the data)
    diffora_gate_lr: float = 3.0e-4  # Adam lr of the gate logits (DARTS' arch_learning_rate)
    diffora_gate_weight_decay: float = 1.0e-3  # weight decay of the gate logits (DARTS' arch_weight_decay)
    diffora_weight_sharing: bool = True  # kept LoRA continue from the search (gate folded into B); false: restart

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.diffora_keep_modules", self.diffora_keep_modules, allow_zero=True)
        if not 0.0 < self.diffora_keep_ratio <= 1.0:  # nan fails too
            raise ConfigError(f"method.diffora_keep_ratio={self.diffora_keep_ratio!r} is invalid; it must be in (0, 1]")
        check_positive("method.diffora_search_epochs", self.diffora_search_epochs)
        check_range("method.diffora_val_fraction", self.diffora_val_fraction, 0.0, 1.0, closed_low=False)
        check_positive("method.diffora_gate_lr", self.diffora_gate_lr)
        check_positive("method.diffora_gate_weight_decay", self.diffora_gate_weight_decay, allow_zero=True)


@params_for("procedure", "flexora", requires_adapter=("lora",))
@dataclass
class FlexoraParams:
    rank: int = 8  # the lora adapter's rank (same key): sizes the kept layers
    flexora_keep_layers: int = 0  # 0: the authors' rule, every layer with alpha_l > 0; k: the k largest alpha_l
    flexora_search_epochs: int = 1  # passes over the search's training share (authors: num_train_epochs 1)
    flexora_val_fraction: float = 0.04  # calibration batches held out (authors: val_size 200 of 5000)
    flexora_hyper_batches: int = 8  # validation batches summed per hyper step (authors' hyper_step, n=8)
    flexora_hyper_lr: float = 0.01  # Adam lr of alpha (authors)
    flexora_gate_power: int = 3  # gate (L softmax(alpha)_l)^p: the authors' hooks scale 3 inputs (dropout, A, B)
    flexora_hypergradient: str = "first_order"  # first_order (authors' code) | unrolled (through one SGD step)

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.flexora_keep_layers", self.flexora_keep_layers, allow_zero=True)
        check_positive("method.flexora_search_epochs", self.flexora_search_epochs)
        check_range("method.flexora_val_fraction", self.flexora_val_fraction, 0.0, 1.0, closed_low=False)
        check_positive("method.flexora_hyper_batches", self.flexora_hyper_batches)
        check_positive("method.flexora_hyper_lr", self.flexora_hyper_lr)
        check_positive("method.flexora_gate_power", self.flexora_gate_power)
        check_choice("method.flexora_hypergradient", self.flexora_hypergradient, HYPERGRADIENTS)
