"""Running a search's points through the normal train path, and reading their records back.

Every point is one ordinary run: its Hydra overrides are composed (``lorabench.config_store.compose``)
and handed to ``lorabench.launch.run_one``, the function ``lorabench train`` calls per job, so a
point's record, run id and skip-if-completed behaviour are those of ``lorabench train``. A task (an
override list) whose completed record exists under its ``results_dir`` is skipped before anything
starts. ``jobs=0`` runs the tasks in this process, one after another (as ``lorabench train -m``);
``jobs=N`` runs them in N fresh worker processes (one process per run, so peak memory is per run),
each with cpu_count / N threads.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import multiprocessing
import os
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path


def option(task: list[str], key: str) -> str:
    """The value of ``key=value`` in an override list (the last one wins, as in Hydra)."""
    values = [item.split("=", 1)[1] for item in task if item.startswith(f"{key}=")]
    if not values:
        raise KeyError(f"no {key}=... in the overrides {task}")
    return values[-1]


def read_if_completed(folder: Path, task: list[str]) -> dict | None:
    """The completed record of ``task`` under ``folder`` (found by run id), else None."""
    from lorabench.config_store import compose
    from lorabench.results.record import run_id

    return read_completed(folder, run_id(compose(task)))


def read_completed(folder: Path, rid: str) -> dict | None:
    """The record ``folder/<rid>/record.json`` when it exists and says completed, else None."""
    from lorabench.results.record import RECORD_NAME, read_record

    path = Path(folder) / rid / RECORD_NAME
    try:
        record = read_record(path) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return record if record and record.get("status") == "completed" else None


def final_metric(record: dict | None, metric: str | None = None) -> float | None:
    """The record's final value of ``metric`` (default: its primary metric), or None when the
    record is missing, not completed, or has no such value."""
    if not record or record.get("status") != "completed":
        return None
    metrics = record.get("metrics") or {}
    value = (metrics.get("final") or {}).get(metric or metrics.get("primary"))
    return None if value is None else float(value)


def run_ids_by_rate(task_for: Callable[[float], list[str]], rates: Iterable[float]) -> dict[float, str]:
    """lr -> the run id of ``task_for(lr)``, composing two configs instead of one per rate: when the
    configs at the first two rates differ in ``train.lr`` alone (nothing else in the config depends
    on the rate), every other rate's config is the first with its ``train.lr`` replaced, which is
    what composing it gives; otherwise each rate is composed."""
    from lorabench.config_store import compose
    from lorabench.results.record import run_id

    rates = list(dict.fromkeys(float(lr) for lr in rates))
    if len(rates) < 2:
        return {lr: run_id(compose(task_for(lr))) for lr in rates}
    first, second = compose(task_for(rates[0])), compose(task_for(rates[1]))
    probe = copy.deepcopy(second)
    probe["train"]["lr"] = first["train"]["lr"]
    if probe != first or first["train"]["lr"] != rates[0] or second["train"]["lr"] != rates[1]:
        return {lr: run_id(compose(task_for(lr))) for lr in rates}
    ids = {rates[0]: run_id(first), rates[1]: run_id(second)}
    for lr in rates[2:]:
        first["train"]["lr"] = lr
        ids[lr] = run_id(first)
    return ids


def run_objective(cfg_dict: dict) -> float | None:
    """What ``lorabench train``'s Hydra task returns to a sweeper (``hydra/sweeper=lr_optuna``):
    the final primary metric of the run ``cfg_dict`` describes, read from its record; None when
    the run did not complete (the Optuna sweeper then marks the trial failed)."""
    from lorabench.errors import ConfigError
    from lorabench.results.record import run_id
    from lorabench.validate import validate_config

    try:
        cfg = validate_config(cfg_dict)
    except ConfigError:
        return None
    return final_metric(read_completed(Path(cfg.results_dir), run_id(dataclasses.asdict(cfg))))


DESCRIBE_KEYS = ("method=", "train.lr=", "seed=", "budget.")


def describe_task(task: list[str], keys: tuple[str, ...] = DESCRIBE_KEYS) -> str:
    """The settings that tell a search's runs apart (overrides starting with ``keys``), for progress lines."""
    return " ".join(t for t in task if t.startswith(keys))


def run_task(
    task: list[str], command: str = "lorabench train", quote: bool = True, keys: tuple[str, ...] = DESCRIBE_KEYS
) -> tuple[str, int]:
    """One run through ``lorabench.launch.run_one``; returns (description with any error, exit code).
    The record's command is ``command`` followed by the overrides (shell-quoted with ``quote``)."""
    from lorabench.config_store import compose
    from lorabench.launch import SWEEP_SUMMARY, run_one

    line = f"{command} " + (shlex.join(task) if quote else " ".join(task))
    code = run_one(compose(task), line, multirun=True)
    what = describe_task(task, keys)
    error = SWEEP_SUMMARY[-1]["error"] if code and SWEEP_SUMMARY else None
    return (f"{what}: {error}" if error else what), code


def _run_in_worker(command: str, quote: bool, keys: tuple[str, ...], task: list[str]) -> tuple[str, int]:
    try:
        return run_task(task, command, quote, keys)
    except SystemExit as exc:  # a canceled run
        return describe_task(task, keys), int(exc.code or 1)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a cgroup, ``taskset`` or a Slurm allocation
    can hold fewer than the machine has, and ``os.cpu_count`` counts the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def run_tasks(
    tasks: list[list[str]],
    jobs: int = 0,
    command: str = "lorabench train",
    log: str = "[lorabench]",
    quote: bool = True,
    keys: tuple[str, ...] = DESCRIBE_KEYS,
) -> list[str]:
    """Run the tasks whose completed record does not exist yet (checked here, so that a resumed
    search spawns no worker just to skip a run); returns the failures, one line each (``keys``:
    the overrides that name a run in them and in the progress lines)."""
    pending = [t for t in tasks if read_if_completed(Path(option(t, "results_dir")), t) is None]
    if len(pending) < len(tasks):
        print(f"{log} {len(tasks) - len(pending)} run(s) already completed: skipped", flush=True)
    if not pending:
        return []
    failures = []

    def report(done: int, what: str, code: int) -> None:
        print(f"{log} {done}/{len(pending)} {what}: {'ok' if code == 0 else f'exit {code}'}", flush=True)
        if code:
            failures.append(f"{what} (exit {code})")

    if jobs <= 0:
        for done, task in enumerate(pending, 1):
            report(done, *run_task(task, command, quote, keys))
        return failures
    threads = max(1, usable_cpus() // jobs)
    ctx = multiprocessing.get_context("spawn")
    work = functools.partial(_run_in_worker, command, quote, keys)
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(threads,), maxtasksperchild=1) as pool:
        for done, (what, code) in enumerate(pool.imap_unordered(work, pending), 1):
            report(done, what, code)
    return failures
