"""Resolve a ``method`` config (a preset YAML plus overrides) into components and typed params.

``lorabench.method_params.check.check_method`` (torch-free) checks the config against the declared
``Params``: an unknown key, a wrong type, an invalid value or an incompatible combination raises
``ConfigError`` there. ``resolve_method`` then builds the components and runs the checks that need
torch (``check_backend``, e.g. QLoRA's need for CUDA), still before any model or data is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from lorabench.method_params.check import CheckedMethod, check_method
from lorabench.methods.fidelity import fidelity_of
from lorabench.registry import ADAPTERS, INITIALIZERS, OPTIMIZERS, PROCEDURES, REGULARIZERS, Registry

AXES: dict[str, Registry] = {
    "adapter": ADAPTERS,
    "init": INITIALIZERS,
    "optimizer": OPTIMIZERS,
    "procedure": PROCEDURES,
    "regularizer": REGULARIZERS,
}


@dataclass
class MethodSpec(CheckedMethod):
    """A checked method config (label, names, typed params, ...) with its component instances."""

    components: dict[str, Any] = field(default_factory=dict)  # axis -> component instance (absent where unused)

    def describe(self) -> dict:
        """What the record stores about the method."""
        return {
            "label": self.label,
            "family": self.family,
            "paper": self.paper,
            **self.names,
            "backed_by": self.backed_by(),
            "params": {axis: OmegaConf.to_container(OmegaConf.structured(p)) for axis, p in self.params.items()},
            "fidelity": self.fidelity(),
        }

    def fidelity(self) -> dict[str, dict]:
        """axis -> the component's fidelity entry (lorabench/methods/fidelity.py)."""
        return {axis: fidelity_of(comp).describe() for axis, comp in self.components.items()}

    def backed_by(self) -> str:
        backends = sorted({c.backed_by for c in self.components.values()} - {"torch"})
        return "+".join(backends) or "torch"


def resolve_method(raw: dict) -> MethodSpec:
    """``check_method(raw)``, then one instance of each named component; a component may define
    ``check_backend(params)`` for a check that needs torch (it raises ``ConfigError``)."""
    checked = check_method(raw)
    components = {
        axis: AXES[axis].get(name, where=f"method.{axis}")() for axis, name in checked.names.items() if name != "none"
    }
    for axis, comp in components.items():
        check_backend = getattr(comp, "check_backend", None)
        if check_backend is not None:
            check_backend(checked.params[axis])
    return MethodSpec(**vars(checked), components=components)
