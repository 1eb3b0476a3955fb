"""Checks of ``protocol=continual`` that span config groups,
torch-free: lorabench.protocols.checks calls :func:`check_continual` from validation, before
anything heavy loads."""

from __future__ import annotations

from lorabench.config import RunConfig
from lorabench.errors import ConfigError


def check_task_list(cfg: RunConfig) -> list:
    """The checks every protocol over a task list makes (``protocol.continual`` and ``protocol.compose``):
    every task is a dataset option, named once; ``data_dirs`` names only tasks; the run's own dataset
    is the first task; all tasks share one head kind and label count; one process for classification
    tasks; each task's primary metric is one of its metrics. Returns the tasks' dataset classes."""
    from lorabench.data.base import resolve_primary
    from lorabench.protocols.continual.tasks import task_config, task_settings
    from lorabench.registry import DATASETS

    protocol = cfg.protocol.name
    settings = task_settings(cfg)
    where = f"protocol.{protocol}"
    tasks = [DATASETS.get(name, where=f"{where}.tasks entry") for name in settings.tasks]
    repeated = sorted({t for t in settings.tasks if settings.tasks.count(t) > 1})
    if repeated:
        raise ConfigError(
            f"{where}.tasks={settings.tasks} names {', '.join(repeated)} more than once; name each task once"
        )
    stray = sorted(set(settings.data_dirs) - set(settings.tasks))
    if stray:
        raise ConfigError(
            f"{where}.data_dirs has folder(s) for {', '.join(stray)}, which are not in {where}.tasks; "
            f"valid keys: {', '.join(settings.tasks)}"
        )
    first = settings.tasks[0]
    if cfg.dataset.name != first:
        raise ConfigError(
            f"protocol={protocol}: dataset={cfg.dataset.name!r} must be the first task of {where}.tasks "
            f"({first!r}): the run's dataset gives the model its head and every task its sizes "
            f"(dataset.max_length, train_size, ...); set dataset={first}"
        )
    given = settings.data_dirs.get(first)
    if given and cfg.dataset.data_dir and given != cfg.dataset.data_dir:
        raise ConfigError(
            f"{where}.data_dirs.{first}={given!r} and dataset.data_dir={cfg.dataset.data_dir!r} name two folders "
            f"for the first task; give one of them"
        )
    kinds = {(t.head, t.num_labels) for t in tasks}
    if len(kinds) > 1:
        described = ", ".join(f"{n}: {t.head} ({t.num_labels} labels)" for n, t in zip(settings.tasks, tasks))
        raise ConfigError(
            f"{where}.tasks must share one head and label count (the model is built once); got {described}"
        )
    if tasks[0].head == "classification" and cfg.hardware.num_processes > 1:
        raise ConfigError(
            f"protocol={protocol} with classification tasks trains one head per task, and DDP needs every trained "
            f"tensor to get a gradient at every step (the other tasks' heads get none); use hardware.num_processes=1 "
            f"(got {cfg.hardware.num_processes}; generation tasks run on several processes)"
        )
    for name, task in zip(settings.tasks, tasks):  # a task's primary metric must be one of its metrics
        resolve_primary(task, task_config(cfg, name))
    return tasks


def check_continual(cfg: RunConfig, method=None) -> list[str]:
    """:func:`check_task_list`, then: the strategy exists and gets what it needs (``method``: the
    checked method, checked here when not given). Returns the tasks' heads."""
    from lorabench.method_params.check import check_method
    from lorabench.protocols.continual.strategies import STRATEGIES

    settings = cfg.protocol.continual
    where = "protocol.continual"
    tasks = check_task_list(cfg)
    strategy = STRATEGIES.get(settings.strategy, where=f"{where}.strategy")
    if strategy.replays and (settings.replay_size == 0 or settings.replay_ratio == 0):
        raise ConfigError(
            f"{where}.strategy={settings.strategy!r} replays examples, but {where}.replay_size="
            f"{settings.replay_size} and {where}.replay_ratio={settings.replay_ratio}; both must be > 0 "
            f"(or use strategy=sequential)"
        )
    if strategy.needs_adapter:
        checked = method if method is not None else check_method(dict(cfg.method))
        if checked.names["adapter"] == "none":
            raise ConfigError(
                f"{where}.strategy={settings.strategy!r} interpolates an adapter, but method {checked.label!r} "
                f"has none (method.adapter=none); use an adapter method (e.g. method=lora) or another strategy "
                f"({', '.join(n for n in STRATEGIES.names() if not STRATEGIES.get(n).needs_adapter)})"
            )
    return [t.head for t in tasks]
