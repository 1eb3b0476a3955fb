"""The shared contract of lorabench's own adapters (DESIGN.md: "wrap a target nn.Linear, expose
delta_weight(), save/load trainable tensors with safetensors").

* ``AdapterLayer`` wraps one frozen ``nn.Linear``: ``forward(x) = base(x) + adapter_forward(x)``;
  adapter tensors are float32 when the base is float16/bfloat16 (as peft's autocast_adapter_dtype).
  Subclasses implement ``delta_weight()`` (the dense d_out x d_in update that the adapter adds to
  the pretrained W0, used for merging, budgets and spectral metrics) and usually a cheaper
  ``adapter_forward``. Inits that promise an unchanged model at step 0 (SoMA/MiLoRA, LaMDA, SVFit,
  ...) keep a frozen copy of the factors' initial values and subtract their product, so that the base
  weight is never modified and ``delta_weight()`` is exactly W - W0. Under autocast such a difference
  must not be formed from two half-precision products (their rounding, of the size of the initial
  product, would swamp it): slora.TriLayer expands it factor by factor (tests/test_bf16_safety.py).
* ``OwnAdapter`` is the ``Adapter`` base for them: ``apply`` wraps every target with ``make_layer``;
  ``expected_trainable`` sums ``layer_trainable(d_out, d_in, params)`` plus the task head.
* ``wrap_targets`` replaces the targeted linears in place, freezing every base parameter and keeping
  the task head trainable for classification.
* ``trainable_state_dict`` / ``save_trainable`` / ``load_trainable``: the trainable tensors plus the
  persistent buffers of adapter layers (frozen factors that cannot be regenerated). Buffers that
  regenerate from a seed or from W0 are registered with ``persistent=False`` and are not saved. A layer
  whose ``packed_tensors()`` is not None (NOLA's quantised coefficients) saves those tensors in place of
  its own trainable parameters, and ``load_trainable`` hands them back to its ``unpack_tensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import HEAD_MODULES, Adapter, MethodContext, head_parameter_count


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable update path."""

    mergeable = True

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.merged = False
        # like peft's autocast_adapter_dtype: half-precision bases get float32 adapter tensors
        half = base.weight.dtype in (torch.float16, torch.bfloat16)
        self.adapter_dtype = torch.float32 if half else base.weight.dtype

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads module.weight (dtype, device)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The dense update Delta W (d_out x d_in) that this adapter adds to the base weight."""
        raise NotImplementedError

    def packed_tensors(self) -> dict[str, torch.Tensor] | None:
        """Tensors to save in place of this layer's own trainable parameters (None: save the parameters)."""
        return None

    def unpack_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore this layer's parameters from what ``packed_tensors`` returned."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update path's output; the default goes through the dense Delta W, formed with autocast off
        (a Delta W computed as a difference of weights would otherwise cancel in half precision), so
        that only the final product with x is rounded to the autocast dtype."""
        with torch.autocast(x.device.type, enabled=False):
            delta = self.delta_weight()
        return nn.functional.linear(x, delta.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Delta W into the base weight; forward then skips the update path."""
        if not self.mergeable:
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")
        if not self.merged:
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _is_target(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored as (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.ndim == 2


def as_linear(module: nn.Module) -> nn.Linear | None:
    """The module as an ``nn.Linear``: itself, or for a ``Conv1D`` an ``nn.Linear`` whose weight is a
    transposed view of the same storage (merging writes through to the original weight)."""
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        return None
    d_in, d_out = module.weight.shape
    linear = nn.Linear(d_in, d_out, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.data.T, requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        linear.bias = module.bias
    return linear


def target_shapes(model: nn.Module, targets: list[str]) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of every targeted linear layer (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    found = []
    for name, module in model.named_modules():
        if _is_target(name, targets) and (isinstance(module, nn.Linear) or is_conv1d(module)):
            d_out, d_in = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            found.append((name, d_out, d_in))
    return found


def wrap_targets(
    model: nn.Module, targets: list[str], factory: Callable[[str, nn.Linear], AdapterLayer], head: str = "causal_lm"
) -> nn.Module:
    """Freeze every parameter, then replace each targeted ``nn.Linear`` (or GPT-2 ``Conv1D``, seen as
    an ``nn.Linear`` view) by ``factory(name, linear)``, whose own parameters train; for
    classification the task head (``base.HEAD_MODULES``) trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(name, as_linear(m)) for name, m in model.named_modules() if _is_target(name, targets)]
    found = [(name, linear) for name, linear in found if linear is not None]
    if not found:
        raise ConfigError(f"no nn.Linear (or Conv1D) module matches target_modules={targets}")
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name, linear))
    if head == "classification":
        for name, p in model.named_parameters():
            if name.split(".")[0] in HEAD_MODULES:
                p.requires_grad_(True)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus the persistent buffers of adapter layers (not of their base)."""
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for lname, layer in adapter_layers(model).items():
        packed = layer.packed_tensors()
        if packed is not None:
            for pname, _ in layer.named_parameters(recurse=False):
                tensors.pop(f"{lname}.{pname}", None)
            tensors.update({f"{lname}.{k}": t.detach() for k, t in packed.items()})
        for bname, buf in layer.named_buffers(recurse=False):
            if bname not in layer._non_persistent_buffers_set and buf is not None:
                tensors[f"{lname}.{bname}"] = buf.detach()
    return tensors


def save_trainable(model: nn.Module, path: str | Path) -> int:
    """Write ``trainable_state_dict`` as safetensors; returns the file size in bytes."""
    tensors = {n: t.cpu().contiguous() for n, t in trainable_state_dict(model).items()}
    save_file(tensors, str(path))
    return Path(path).stat().st_size


@torch.no_grad()
def load_trainable(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy saved tensors into a model wrapped by the same method (same config and seed)."""
    saved = load_file(str(path))
    expected = trainable_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter file {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, target in expected.items():
        if target.shape != saved[name].shape:
            raise ValueError(f"{name}: saved shape {tuple(saved[name].shape)} != model shape {tuple(target.shape)}")
        target.copy_(saved[name].to(target.device, target.dtype))
    for lname, layer in adapter_layers(model).items():
        packed = layer.packed_tensors()
        if packed is not None:
            layer.unpack_tensors({k: saved[f"{lname}.{k}"] for k in packed})
    return model


class OwnAdapter(Adapter):
    """Base for lorabench's own adapters: subclasses define ``make_layer`` and ``layer_trainable``."""

    backed_by = "lorabench"

    def make_layer(self, name: str, linear: nn.Linear, params: Any, ctx: MethodContext) -> AdapterLayer:
        raise NotImplementedError

    def layer_trainable(self, d_out: int, d_in: int, params: Any) -> int:
        raise NotImplementedError

    def prepare(self, model: nn.Module, params: Any, ctx: MethodContext) -> None:
        """Runs before wrapping (e.g. to estimate gradients on the unwrapped model)."""

    def apply(self, model: nn.Module, params: Any, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        if init_kwargs:
            raise ConfigError(
                f"adapter {getattr(self, 'registry_name', type(self).__name__)!r} takes no "
                f"initializer arguments (got {sorted(init_kwargs)}); use method.init=none"
            )
        self.prepare(model, params, ctx)
        return wrap_targets(model, ctx.target_modules, lambda n, lin: self.make_layer(n, lin, params, ctx), ctx.head)

    def expected_trainable(self, base_model: nn.Module, params: Any, ctx: MethodContext) -> int:
        own = sum(
            self.layer_trainable(d_out, d_in, params)
            for _, d_out, d_in in target_shapes(base_model, ctx.target_modules)
        )
        return own + head_parameter_count(base_model, ctx.head)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose seed depends on the run seed and the layer name (stable across runs)."""
    import zlib

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def top_svd(w: torch.Tensor, r: int, smallest: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD in float32: the r largest (or smallest) triplets U_r (d_out x r), S_r (r), V_r^T (r x d_in)."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    sl = slice(-r, None) if smallest else slice(0, r)
    return u[:, sl], s[sl], vh[sl, :]


def check_rank(r: int, d_out: int, d_in: int, name: str) -> None:
    if r > min(d_out, d_in):
        raise ConfigError(f"method.rank={r} exceeds min(d_out, d_in)={min(d_out, d_in)} of {name}")
