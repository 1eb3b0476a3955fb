"""Resolve a ``method`` config (a preset YAML plus overrides) into components and typed params.

A preset is flat: the keys below name the components and the label, every other key is a
hyper-parameter that one of the chosen components declares in its ``Params`` dataclass. An unknown
key, a wrong type, an invalid value or an incompatible combination raises ``ConfigError`` before
any model or data is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lorabench.errors import ConfigError
from lorabench.methods.fidelity import fidelity_of
from lorabench.registry import ADAPTERS, INITIALIZERS, OPTIMIZERS, PROCEDURES, Registry

# label: what tables show; family: how `lorabench methods` groups it; lr overrides train.lr;
# target_modules: "default" takes the model's list, "all-linear" every linear layer but the head.
COMMON_KEYS = ("label", "family", "paper", "adapter", "init", "optimizer", "procedure", "lr", "target_modules")
AXES: dict[str, Registry] = {
    "adapter": ADAPTERS,
    "init": INITIALIZERS,
    "optimizer": OPTIMIZERS,
    "procedure": PROCEDURES,
}


@dataclass
class MethodSpec:
    label: str
    family: str
    paper: str
    lr: float | None
    target_modules: list[str] | str
    names: dict[str, str]  # axis -> registry name ("none" where unused)
    components: dict[str, Any]  # axis -> component instance (absent where unused)
    params: dict[str, Any]  # axis -> Params dataclass instance

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


def _build_params(cls: type, values: dict, where: str) -> Any:
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {msg}") from None


def resolve_method(raw: dict) -> MethodSpec:
    if "label" not in raw or not raw["label"]:
        raise ConfigError("method.label is missing; every method preset names the label that tables show")
    label = raw["label"]
    names = {axis: str(raw.get(axis) or "none") for axis in AXES}
    if names["optimizer"] == "none":
        raise ConfigError(
            f"method {label!r}: method.optimizer is required; valid choices: {', '.join(OPTIMIZERS.names())}"
        )
    components = {axis: AXES[axis].get(name, where=f"method.{axis}") for axis, name in names.items() if name != "none"}
    components = {axis: cls() for axis, cls in components.items()}
    _check_compatibility(label, names, components)

    owned: dict[str, list[str]] = {}
    for axis, comp in components.items():
        for f in fields(comp.Params):
            owned.setdefault(f.name, []).append(axis)
    unknown = sorted(set(raw) - set(COMMON_KEYS) - set(owned))
    if unknown:
        valid = sorted(set(COMMON_KEYS) | set(owned))
        raise ConfigError(
            f"unknown key(s) {', '.join('method.' + k for k in unknown)} for method {label!r}; "
            f"valid keys: {', '.join(valid)}"
        )
    params = {}
    for axis, comp in components.items():
        values = {k: v for k, v in raw.items() if axis in owned.get(k, [])}
        params[axis] = _build_params(comp.Params, values, f"method {label!r} ({axis} {names[axis]!r})")

    lr = raw.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"method.lr={lr!r} is invalid; it must be a number > 0 (or null to use train.lr)")
    targets = raw.get("target_modules", "default")
    if isinstance(targets, str) and targets not in ("default", "all-linear"):
        raise ConfigError(
            f"method.target_modules={targets!r} is invalid; use 'default', 'all-linear' or a list of names"
        )
    return MethodSpec(
        label,
        str(raw.get("family", "other")),
        str(raw.get("paper", "")),
        lr,
        list(targets) if not isinstance(targets, str) else targets,
        names,
        components,
        params,
    )


def _check_compatibility(label: str, names: dict[str, str], components: dict[str, Any]) -> None:
    """Components may declare ``requires_adapter``: a tuple of adapter names they work with."""
    for axis, comp in components.items():
        needed = getattr(comp, "requires_adapter", None)
        if needed and names["adapter"] not in needed:
            raise ConfigError(
                f"method {label!r}: {axis} {names[axis]!r} needs method.adapter in {list(needed)}, "
                f"got {names['adapter']!r}"
            )
