"""Checking a configuration before anything heavy loads: Hydra overrides composed and validated
(one ``ConfigError`` line per problem), a resolved config dict turned into a ``RunConfig`` and a
``MethodSpec``.

Used by ``lorabench train`` (lorabench.cli), ``lorabench tune`` (lorabench.tuning), ``reproduce`` and
``export``; it imports neither the CLI nor, until :func:`build_run` resolves the method, torch.
"""

from __future__ import annotations

from lorabench.errors import ConfigError


# -- config -----------------------------------------------------------------------------------------
def validate_config(cfg_dict: dict):
    """Plain dict (resolved config) -> validated ``RunConfig``; raises ConfigError.

    Guarantee: imports neither torch, transformers nor peft (only OmegaConf, the config dataclasses,
    the dataset registry, lorabench.models' path check and the method components' ``Params``, which
    live in lorabench/method_params/), so every error it finds, the method's hyper-parameters and
    components included, is answered in about Hydra's own time. The one exception is
    ``hardware.device=cuda``, which imports torch to ask whether CUDA is there."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import lorabench.data  # noqa: F401  registers datasets (torch-free at import)
    from lorabench.config import RunConfig, check_all_finite, validate_run
    from lorabench.method_params.check import check_method
    from lorabench.models import check_local_path
    from lorabench.registry import DATASETS
    from lorabench.trackers import check_tracker

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg_dict))
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(str(exc).splitlines()[0] + f" (at {getattr(exc, 'full_key', '?')})") from None
    check_all_finite(cfg_dict)  # the method's hyper-parameters too, before any method code loads
    _check_device(cfg)
    check_tracker(cfg.tracker)
    validate_run(cfg)
    if cfg.model.source == "local":
        check_local_path(cfg.model)  # a missing folder, named, before transformers reads it as a hub id
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    for key, value in (("labelled_logits", cfg.hardware.labelled_logits), ("loss_chunk", cfg.hardware.loss_chunk)):
        if value not in (False, None) and task.head != "causal_lm":
            raise ConfigError(
                f"hardware.{key}={str(value).lower()} applies to language-model losses; "
                f"dataset={cfg.dataset.name!r} trains a {task.head} head"
            )
    if task.head == "causal_lm" and cfg.model.architecture != "decoder":
        raise ConfigError(
            f"dataset={cfg.dataset.name!r} needs a decoder model (generation); model={cfg.model.name!r} "
            f"is an {cfg.model.architecture}"
        )
    try:
        checked = check_method(dict(cfg.method))
    except ConfigError as exc:  # a Params type error: say which key (OmegaConf's first line does not)
        key = getattr(exc.__context__, "full_key", None)
        if key and f"method.{key}" not in str(exc):
            raise ConfigError(f"{exc} (at method.{key})") from None
        raise
    from lorabench.frozen_dtype import check_frozen_dtype
    from lorabench.method_params.check import check_run_fit
    from lorabench.protocols.checks import check_protocol

    check_frozen_dtype(cfg, checked.names["adapter"])
    check_run_fit(cfg, checked)
    check_protocol(cfg, checked)
    return cfg


def build_run(cfg_dict: dict):
    """Plain dict (resolved config) -> validated (RunConfig, MethodSpec). Raises ConfigError.

    :func:`validate_config` runs first (torch-free; it checks the method's hyper-parameters too); only
    then is the method resolved, which imports ``lorabench.methods`` and with it torch and peft (the
    component modules import them at the top), and runs the checks that need torch (QLoRA's and
    LoftQ's need for CUDA)."""
    cfg = validate_config(cfg_dict)
    import lorabench.methods  # noqa: F401  registers methods (imports torch, peft)
    from lorabench.methods.spec import resolve_method

    return cfg, resolve_method(dict(cfg.method))


def _check_device(cfg) -> None:
    if cfg.hardware.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"hardware={cfg.hardware.name!r} needs CUDA, but torch.cuda.is_available() is False; use hardware=cpu"
        )
    if cfg.hardware.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("hardware.mixed_precision='bf16' is not supported by this GPU; use 'fp16' or 'no'")


# -- Hydra overrides -------------------------------------------------------------------------------
def hydra_error_line(exc: Exception) -> str:
    """One line for a Hydra composition error: the problem, the offending override or key, and the
    valid choices (a group's options, or the keys of the config node an unknown key was set on)."""
    text = str(exc)
    if "Available options in" in text:
        head, _, rest = text.partition("Available options in")
        options = []
        for line in rest.splitlines()[1:]:
            if not line.startswith("\t"):  # "Config search path:" follows the options
                break
            options.append(line.strip())
        problem = head.replace("In 'config': ", "").strip()
        return f"{problem}; valid choices: {', '.join(options)}"
    noise = ("See https", "To append to your config")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(noise)]
    cause = exc.__cause__
    if cause is not None:
        first = str(cause).splitlines()[0].strip()
        lines.append(first)
        key = getattr(cause, "full_key", None)
        if key and type(cause).__name__ == "ConfigAttributeError":
            valid = _valid_keys(key.rpartition(".")[0])
            if valid:
                lines.append(f"valid keys: {', '.join(valid)}")
    return "; ".join(line.rstrip(".") for line in lines)


def _valid_keys(parent: str) -> list[str]:
    from lorabench.config_store import compose

    node = compose([])
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, dict) else None
    return sorted(node) if isinstance(node, dict) else []


MULTIRUN_FLAGS = ("-m", "--multirun")
MAX_CHECKED_JOBS = 256  # a sweep's jobs composed and validated up front (a larger grid: the first 256)


def sweep_jobs(overrides: list[str]) -> list[list[str]] | None:
    """A basic-sweeper multirun's job overrides (the cartesian product Hydra will launch), or None
    when another sweeper (e.g. ``hydra/sweeper=optuna``) chooses the jobs itself."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(
        o.key_or_group in ("hydra/sweeper", "hydra.sweeper") or o.key_or_group.startswith("hydra.sweeper.")
        for o in parsed
    ):
        return None
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def _compose_checked(overrides: list[str], where: str = "") -> dict:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lorabench.config_store import compose

    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(where + hydra_error_line(exc)) from None


def check_overrides(argv: list[str]) -> None:
    """Compose the overrides through Hydra's compose API before Hydra runs, so that an unknown group
    option, key or ill-typed value is one ``ConfigError`` line (exit 2) rather than Hydra's
    multi-line report. A sweep (``-m``) is expanded into its jobs; each is composed and validated
    (torch-free) before the first one trains, and an error names the job's overrides. Other Hydra
    flags (``--cfg``, ``-c``, completion, ...) are left to Hydra itself."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in MULTIRUN_FLAGS for flag in flags):
        return
    overrides = [arg for arg in argv if not arg.startswith("-")]
    if not flags:
        _compose_checked(overrides)
        return
    try:
        jobs = sweep_jobs(overrides)
    except Exception as exc:  # Hydra's override grammar: one line, not its parser trace
        raise ConfigError(f"cannot parse the sweep overrides: {str(exc).splitlines()[0]}") from None
    if jobs is None:
        return
    for num, job in enumerate(jobs[:MAX_CHECKED_JOBS]):
        task = [o for o in job if not o.startswith(("hydra.", "hydra/"))]  # what the job echo shows
        where = f"sweep job #{num} ({' '.join(task) or 'defaults'}): "
        cfg_dict = _compose_checked(job, where)
        try:
            validate_config(cfg_dict)
        except ConfigError as exc:
            raise ConfigError(where + str(exc)) from None
