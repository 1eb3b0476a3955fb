"""Intruder dimensions (Shuttleworth et al., 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv:2410.21228).

For a pretrained weight W0 and its fine-tuned version W (for adapters: the merged W0 + dW), take
the SVDs. A left singular vector y_j among the top-k of W (by singular value) is an *intruder* if
max_i |cos(y_j, x_i)| < epsilon over *all* left singular vectors x_i of W0: a high-ranking
direction the pretrained weight did not have. The paper finds that LoRA creates them and full
fine-tuning (or high-rank rsLoRA) mostly does not.

Defaults follow peft >= 0.19 (``peft.tuners.lora.intruders.reduce_intruder_dimension``, which
detects and then mitigates): top_k = 10, epsilon = 0.5, left singular vectors (U), SVD in float32.
peft offers detection only fused with mitigation on a LoRA adapter, so the count is computed here
for any method whose weights can be merged.

Use: ``pre = snapshot(model, targets)`` *before* the method is applied (PiSSA, LoRA-GA, CorDA and
LoftQ rewrite the base weight in place), then ``model_intruders(pre, trained_model)``. The training
loop keeps the snapshot on disk (:func:`snapshot_to_file`), not in memory, while it trains: for
SmolLM2-135M's projections that is 0.26 GB less resident memory at the training peak.
"""

from __future__ import annotations

import copy
import os
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lorabench.methods.base import target_linear_weights

TOP_K = 10
EPSILON = 0.5


@dataclass
class IntruderReport:
    per_layer: dict[str, int]
    total: int
    top_k: int = TOP_K
    epsilon: float = EPSILON
    skipped: list[str] = field(default_factory=list)  # names without a matching 2-D weight of the same shape

    def as_dict(self) -> dict:
        return {
            "intruders_total": self.total,
            "intruders_per_layer": dict(self.per_layer),
            "intruders_top_k": self.top_k,
            "intruders_epsilon": self.epsilon,
            "intruders_skipped": self.skipped,
        }


@torch.no_grad()
def intruder_count(w0: torch.Tensor, w: torch.Tensor, top_k: int = TOP_K, epsilon: float = EPSILON) -> int:
    """Number of the top-k left singular vectors of ``w`` whose max |cos| to every left singular
    vector of ``w0`` is below ``epsilon``."""
    if w0.shape != w.shape or w0.ndim != 2:
        raise ValueError(
            f"intruder_count needs two 2-D weights of one shape, got {tuple(w0.shape)} and {tuple(w.shape)}"
        )
    u0 = torch.linalg.svd(w0.detach().float().cpu(), full_matrices=False)[0]
    u = torch.linalg.svd(w.detach().float().cpu(), full_matrices=False)[0]
    k = min(top_k, u.shape[1])
    max_cos = (u[:, :k].T @ u0).abs().max(dim=1).values  # columns are unit vectors
    return int((max_cos < epsilon).sum().item())


def snapshot(model: nn.Module, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the pretrained 2-D linear weights (those of ``targets``, or of every linear
    layer when ``targets`` is None), keyed by the base model's parameter names."""
    return {name: w.detach().float().cpu().clone() for name, w in _linear_weights(model, targets)}


def _linear_weights(model: nn.Module, targets: list[str] | None) -> list[tuple[str, torch.Tensor]]:
    if targets is None:
        return [(f"{n}.weight", m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return target_linear_weights(model, targets)


class SavedWeights(Mapping):
    """Weights written to a temporary safetensors file and read back one at a time; the file is
    removed with the object (or at exit)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._finalizer = weakref.finalize(self, _remove, path)
        with safe_open(path, framework="pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def discard(self) -> None:
        self._finalizer()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def snapshot_to_file(model: nn.Module, targets: list[str] | None = None) -> SavedWeights:
    """:func:`snapshot`, kept in a temporary file instead of memory: each weight is written as it is
    (no in-memory copy of the whole set is made)."""
    from safetensors.torch import save_file

    fd, path = tempfile.mkstemp(prefix="lorabench-pretrained-", suffix=".safetensors")
    os.close(fd)
    save_file({name: w.detach().float().cpu().contiguous() for name, w in _linear_weights(model, targets)}, path)
    return SavedWeights(path)


@torch.no_grad()
def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """2-D weights of ``model`` as a plain model would hold them, keyed by the base model's names:
    a peft model is merged on a copy (``merge_and_unload``); lorabench's own adapter layers
    contribute base weight + ``delta_weight()``."""
    from lorabench.methods.adapters.layer import adapter_layers

    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        from lorabench.distributed import is_partitioned

        if is_partitioned(model):  # FSDP/ZeRO-3 refuse deepcopy; inside whole_model the parameters are whole
            return _peft_lora_weights(model)
        model = copy.deepcopy(model).merge_and_unload()
    weights = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.ndim == 2}
    for name, layer in adapter_layers(model).items():
        base = layer.base.weight.detach().float().cpu()
        delta = layer.delta_weight().detach().float().cpu()
        if layer.merged:
            delta = torch.zeros_like(delta)
        weights[f"{name}.weight"] = base + (delta if delta.shape == base.shape else delta.T)
    return weights


def _peft_lora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``merged_weights`` of a peft LoRA model without copying it: every 2-D weight, and for each
    LoRA layer base weight + ``get_delta_weight`` (what ``merge_and_unload`` adds), keyed by the base
    model's names. Adapters whose merge is not an added delta (DoRA's magnitude) are refused."""
    from peft.tuners.lora import LoraLayer

    weights = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and "lora_" not in name:
            weights[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p.detach().float().cpu()
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if any(layer.use_dora.values()):
            raise ValueError("intruder analysis of a sharded DoRA model: its merge is not an added delta")
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        key = name.removeprefix("base_model.model.") + ".weight"
        weights[key] = weights[key] + delta.detach().float().cpu()
    return weights


def model_intruders(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: nn.Module | Mapping[str, torch.Tensor],
    top_k: int = TOP_K,
    epsilon: float = EPSILON,
) -> IntruderReport:
    """Intruder counts for every weight in ``pretrained`` (see ``snapshot``) against the fine-tuned
    model (or a name -> weight mapping), per layer and in total."""
    tuned = dict(finetuned) if isinstance(finetuned, Mapping) else merged_weights(finetuned)
    per_layer, skipped = {}, []
    for name, w0 in pretrained.items():
        w = tuned.get(name)
        if w is None or w.shape != w0.shape:
            skipped.append(name)
            continue
        per_layer[name] = intruder_count(w0, w, top_k, epsilon)
    return IntruderReport(per_layer, sum(per_layer.values()), top_k, epsilon, skipped)
