"""Check a ``method`` config (a preset YAML plus overrides) against the declared ``Params``, torch-free.

A preset is flat: the keys below name the components and the label, every other key is a
hyper-parameter that one of the chosen components declares in its ``Params`` dataclass. An unknown
component or key, a wrong type, an invalid value or an incompatible combination raises
``ConfigError``. ``lorabench.validate.validate_config`` runs this before torch loads;
``lorabench.methods.spec.resolve_method`` runs it, then builds the components.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lorabench.errors import ConfigError
from lorabench.method_params.registry import AXIS_NAMES, PARAMS, entry

# label: what tables show; family: how `lorabench methods` groups it; lr overrides train.lr;
# target_modules: "default" takes the model's list, "all-linear" every linear layer but the head.
COMMON_KEYS = (
    "label",
    "family",
    "paper",
    "adapter",
    "init",
    "optimizer",
    "procedure",
    "regularizer",
    "lr",
    "target_modules",
)


@dataclass
class CheckedMethod:
    """A method config that passed every check: what ``resolve_method`` builds components from."""

    label: str
    family: str
    paper: str
    lr: float | None
    target_modules: list[str] | str
    names: dict[str, str]  # axis -> registry name ("none" where unused)
    params: dict[str, Any]  # axis -> Params dataclass instance (absent where unused)


def _build_params(cls: type, values: dict, where: str) -> Any:
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {msg}") from None


def check_method(raw: dict) -> CheckedMethod:
    """``raw`` -> the names and typed params; raises ``ConfigError`` naming the bad value."""
    if "label" not in raw or not raw["label"]:
        raise ConfigError("method.label is missing; every method preset names the label that tables show")
    label = raw["label"]
    names = {axis: str(raw.get(axis) or "none") for axis in AXIS_NAMES}
    if names["optimizer"] == "none":
        raise ConfigError(
            f"method {label!r}: method.optimizer is required; valid choices: {', '.join(PARAMS['optimizer'].names())}"
        )
    entries = {axis: entry(axis, name) for axis, name in names.items() if name != "none"}
    _check_compatibility(label, names, entries)

    owned: dict[str, list[str]] = {}
    for axis, declared in entries.items():
        for f in fields(declared.params):
            owned.setdefault(f.name, []).append(axis)
    unknown = sorted(set(raw) - set(COMMON_KEYS) - set(owned))
    if unknown:
        valid = sorted(set(COMMON_KEYS) | set(owned))
        raise ConfigError(
            f"unknown key(s) {', '.join('method.' + k for k in unknown)} for method {label!r}; "
            f"valid keys: {', '.join(valid)}"
        )
    params = {}
    for axis, declared in entries.items():
        values = {k: v for k, v in raw.items() if axis in owned.get(k, [])}
        params[axis] = _build_params(declared.params, values, f"method {label!r} ({axis} {names[axis]!r})")

    lr = raw.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"method.lr={lr!r} is invalid; it must be a number > 0 (or null to use train.lr)")
    targets = raw.get("target_modules", "default")
    if isinstance(targets, str) and targets not in ("default", "all-linear"):
        raise ConfigError(
            f"method.target_modules={targets!r} is invalid; use 'default', 'all-linear' or a list of names"
        )
    return CheckedMethod(
        label,
        str(raw.get("family", "other")),
        str(raw.get("paper", "")),
        lr,
        list(targets) if not isinstance(targets, str) else targets,
        names,
        params,
    )


def _check_compatibility(label: str, names: dict[str, str], entries: dict[str, Any]) -> None:
    """Components may declare ``requires_adapter``: a tuple of adapter names they work with."""
    for axis, declared in entries.items():
        needed = declared.requires_adapter
        if needed and names["adapter"] not in needed:
            raise ConfigError(
                f"method {label!r}: {axis} {names[axis]!r} needs method.adapter in {list(needed)}, "
                f"got {names['adapter']!r}"
            )


def check_run_fit(cfg, method: CheckedMethod) -> None:
    """Method options that constrain the rest of the run (torch-free; raises ConfigError): a
    regularizer that reads the model's outputs needs the whole logits; ``method.layerwise`` updates
    each weight inside the backward pass, so nothing may need every gradient before the update
    (lorabench.methods.optimizers.galore_family.GaLoreFamily.enable_layerwise)."""
    _check_regularizer_fit(cfg, method)
    check_strategy(cfg, method)
    optimizer = method.params.get("optimizer")
    if not getattr(optimizer, "layerwise", False):
        return
    accumulation = cfg.gradient_accumulation()
    whole_batch = cfg.train.global_batch_size // cfg.hardware.num_processes
    conflicts = {
        "train.max_grad_norm": (cfg.train.max_grad_norm is not None, "null (clipping needs the global gradient norm)"),
        "gradient accumulation": (
            accumulation != 1,
            f"1 (it is {accumulation}: set hardware.micro_batch_size={whole_batch})",
        ),
        "hardware.num_processes": (cfg.hardware.num_processes != 1, "1"),
        "train.nonfinite": (cfg.train.nonfinite == "skip", "stop (an update already made cannot be skipped)"),
        "method.regularizer": (
            method.names.get("regularizer", "none") != "none",
            "none (a regularizer acts between the backward and the update)",
        ),
    }
    for key, (bad, needed) in conflicts.items():
        if bad:
            raise ConfigError(
                f"method.layerwise=true updates each weight during the backward pass: {key} must be {needed}"
            )


# which ParamsEntry declarations a strategy reads (zero3 partitions the weights too: FSDP's reasons also hold)
STRATEGY_DECLARATIONS = {"ddp": ("ddp",), "fsdp": ("sharding",), "zero2": ("zero",), "zero3": ("zero", "sharding")}


def strategy_conflicts(method: CheckedMethod, strategy: str = "fsdp") -> list[str]:
    """Why ``method`` cannot run under ``hardware.strategy`` on several processes: one line per
    component that declares it (``STRATEGY_DECLARATIONS``: ``ParamsEntry.sharding`` for fsdp,
    ``.ddp`` for ddp, ``.zero`` for ZeRO); empty if it can."""
    out = []
    for axis, name in method.names.items():
        if name == "none":
            continue
        declared = entry(axis, name)
        reasons = dict.fromkeys(getattr(declared, key) for key in STRATEGY_DECLARATIONS[strategy])
        out.extend(f"{axis} {name!r} {reason}" for reason in reasons if reason != "any")
    return out


# settings of a run that a sharded strategy does not support yet: key -> (refused when, what works)
SHARDED_RUN_LIMITS = {
    "protocol.name": (
        lambda cfg: cfg.protocol.name != "single",
        "single (the multi-task, federated and compressed protocols keep whole per-task or packed tensors)",
    ),
}
# the same for DeepSpeed ZeRO (lorabench.distributed): its engine steps inside the backward and holds
# the optimizer state as flat partitions
ZERO_RUN_LIMITS = {
    **SHARDED_RUN_LIMITS,
    "checkpoint.every": (
        lambda cfg: cfg.hardware.strategy == "zero3" and bool(cfg.checkpoint.every),
        "0 under zero3 (its optimizer keeps each partition's state under tensors it swaps in for the "
        "step, which a checkpoint cannot address yet; zero2, fsdp and ddp runs checkpoint and resume)",
    ),
    "train.nonfinite": (
        lambda cfg: cfg.train.nonfinite == "skip",
        "stop (ZeRO applies the update inside the backward: a non-finite step cannot be skipped)",
    ),
    "hardware.mixed_precision": (
        lambda cfg: cfg.hardware.mixed_precision == "fp16",
        "bf16 or no (fp16 needs a loss scaler around DeepSpeed's step)",
    ),
}


def check_strategy(cfg, method: CheckedMethod) -> None:
    """``hardware.strategy``: a sharded one (FSDP2, ZeRO-3) needs every component to run on shards,
    ZeRO (2 and 3) every component to leave gradients and weights to DeepSpeed's step, and the run's
    other settings to allow it; one line says why not and what works instead."""
    from lorabench.distributed import SHARDED, ZERO_STAGES

    strategy = cfg.hardware.strategy
    if strategy not in SHARDED and strategy not in ZERO_STAGES:
        conflicts = strategy_conflicts(method, strategy) if cfg.hardware.num_processes > 1 else []
        if conflicts:
            raise ConfigError(
                f"hardware.strategy={strategy} on {cfg.hardware.num_processes} processes: method {method.label!r}: "
                f"{'; '.join(conflicts)}"
            )
        return
    if strategy in ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"hardware.strategy={strategy} runs DeepSpeed, which is not installed: pip install 'lorabench[deepspeed]' "
            "(or use hardware.strategy=fsdp)"
        )
    conflicts = strategy_conflicts(method, strategy)
    if conflicts:
        what = "shards every weight over the processes" if strategy in SHARDED else "partitions the optimizer state"
        raise ConfigError(
            f"hardware.strategy={strategy} {what}, but method {method.label!r}: "
            f"{'; '.join(conflicts)}; use hardware.strategy=ddp (each process holds the whole model)"
        )
    adapter = method.params.get("adapter")
    if strategy in SHARDED and getattr(adapter, "use_dora", False) and cfg.analysis.intruders:
        raise ConfigError(  # merged without a copy: an added delta
            f"hardware.strategy={strategy} with use_dora=true needs analysis.intruders=false (the sharded model "
            "is not copied, and DoRA's merge is not an added delta)"
        )
    limits = ZERO_RUN_LIMITS if strategy in ZERO_STAGES else SHARDED_RUN_LIMITS
    for key, (refused, works) in limits.items():
        if refused(cfg):
            raise ConfigError(f"hardware.strategy={strategy} needs {key}={works}")


def _check_regularizer_fit(cfg, method: CheckedMethod) -> None:
    """A regularizer's own check of the adapter's settings (``check_adapter``); one that reads the
    model's outputs needs the model's own forward: the memory-saving losses, which never form the
    whole logits, are refused with it."""
    regularizer = method.params.get("regularizer")
    check_adapter = getattr(regularizer, "check_adapter", None)
    if check_adapter is not None:
        check_adapter(method.params.get("adapter"))
    needs = getattr(regularizer, "needs_outputs", None)
    if not needs:
        return
    for key, value in (("labelled_logits", cfg.hardware.labelled_logits), ("loss_chunk", cfg.hardware.loss_chunk)):
        if value not in (False, None):
            raise ConfigError(
                f"method.regularizer={method.names['regularizer']!r} reads the model's {needs}: "
                f"hardware.{key} must be {'false' if key == 'labelled_logits' else 'null'} with it"
            )
