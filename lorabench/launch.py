"""Running one resolved configuration, as ``lorabench train`` does for each job: validate, pre-flight
check, train in this process or re-launch under ``accelerate launch``, and collect the sweep summary.

The launcher that ``lorabench train`` (lorabench.cli), ``lorabench tune`` (lorabench.tuning),
``reproduce`` and the multi-process worker (lorabench.worker) share; nothing here imports the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from lorabench.errors import ConfigError, DataError, ModelSourceError
from lorabench.validate import build_run

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
USER_ERRORS = (ConfigError, DataError, ModelSourceError)
SWEEP_SUMMARY: list[dict] = []  # one row per run of this process's sweep: run, status, error


def err(message: str) -> None:
    """``lorabench: error: MESSAGE`` on stderr."""
    print(f"lorabench: error: {message}", file=sys.stderr)


# -- one run ----------------------------------------------------------------------------------------
def _under_launcher() -> bool:
    """Inside a launched process (a launcher set LOCAL_RANK, or lorabench's ACCELERATE_LAUNCHED); the
    LOCAL_RANK an earlier one-process FSDP/ZeRO run set for itself does not count."""
    from lorabench.distributed import set_for_a_world_of_one

    own = "LOCAL_RANK" in os.environ and not set_for_a_world_of_one("LOCAL_RANK")
    return own or "ACCELERATE_LAUNCHED" in os.environ


PORT_RANGE_ENV = "LORABENCH_PORT_RANGE"  # "low-high": choose launch ports there (see _free_port)
_last_port: list[int] = []


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free local TCP port for a launch's rendezvous: the operating system's choice, or, with
    ``LORABENCH_PORT_RANGE=low-high``, the next free one in that range after the last one given. A
    port is only reserved once the launched process binds it, so concurrent launchers (e.g. parallel
    test workers) given disjoint ranges cannot be handed the same port in between."""
    wanted = os.environ.get(PORT_RANGE_ENV)
    if not wanted:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    try:
        low, high = (int(part) for part in wanted.split("-"))
    except ValueError:
        raise ConfigError(f"{PORT_RANGE_ENV}={wanted!r} is invalid; use low-high, e.g. 21000-21499") from None
    span = high - low + 1
    start = (_last_port[-1] + 1 - low) % span if _last_port else 0
    for step in range(span):
        port = low + (start + step) % span
        if _bindable(port):
            _last_port[:] = [port]
            return port
    raise ConfigError(f"{PORT_RANGE_ENV}={wanted}: no free port in the range")


def launched_status(cfg, code: int) -> str:
    """A launched run's line in the sweep summary: what its record says (a run another process
    owns is ``skipped``: its record is that process's), or ``failed`` for a non-zero exit."""
    from lorabench.results.record import RECORD_NAME, read_record, run_id

    if code:
        return "failed"
    path = Path(cfg.results_dir) / run_id(dataclasses.asdict(cfg)) / RECORD_NAME
    try:
        record = read_record(path)
    except (OSError, ValueError):
        return "completed"
    # the launched processes have exited: a record still running belongs to the process that owns the run
    return "skipped" if record.get("status") == "running" else record["status"]


def accelerate_launch(num_processes: int, mixed_precision: str, target: list[str]) -> list[str]:
    """The ``accelerate launch`` command line for ``num_processes`` local processes (gloo on CPU,
    NCCL on CUDA) on a free port, running ``target`` (``-m module args`` or ``script args``)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--multi_gpu",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        mixed_precision,
        *target,
    ]


def launch_distributed(cfg, command: str) -> int:
    """Re-launch this run under ``accelerate launch`` with the resolved config (every rank then
    agrees on the run id), instead of letting each rank compose Hydra configs itself."""
    from lorabench.results.record import run_id

    cfg_dict = dataclasses.asdict(cfg)
    run_dir = Path(cfg.results_dir) / run_id(cfg_dict)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "launch_config.json"
    config_path.write_text(json.dumps({"config": cfg_dict, "command": command}, indent=2))
    launch = accelerate_launch(
        cfg.hardware.num_processes, cfg.hardware.mixed_precision, ["-m", "lorabench.worker", str(config_path)]
    )
    print(f"[lorabench] launching {cfg.hardware.num_processes} processes: {shlex.join(launch[2:])}")
    env = {**os.environ, "ACCELERATE_LAUNCHED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    from lorabench.distributed import OWN_LOCAL_RANK, set_for_a_world_of_one

    if set_for_a_world_of_one("LOCAL_RANK"):  # this process's own world of one, not the launched processes'
        env.pop("LOCAL_RANK")
        env.pop(OWN_LOCAL_RANK)
    return subprocess.call(launch, env=env)


def results_dir_of(results_dir: str, hydra_overrides: list[str], multirun: bool) -> str:
    """Where the run's folder goes: ``results_dir``, unless the command set Hydra's output folder
    (``hydra.run.dir=DIR`` for one run, ``hydra.sweep.dir=DIR`` for a sweep): then DIR, so that the
    run folder ``DIR/<run_id>`` is inside the folder the user asked for."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [o.split("=", 1)[1] for o in hydra_overrides if o.lstrip("+~").startswith(key)]
    return given[-1] if given else results_dir


def write_hydra_files(cfg_dict: dict, job_overrides: list[str]) -> None:
    """Keep the composed config and the overrides with the run, as Hydra's ``.hydra/`` folder does
    (``<run dir>/.hydra/config.yaml``, ``overrides.yaml``): the run folder says how it was made."""
    from omegaconf import OmegaConf

    from lorabench.results.record import run_id

    folder = Path(cfg_dict["results_dir"]) / run_id(cfg_dict) / ".hydra"
    if (folder / "config.yaml").exists():  # a resumed or skipped run keeps the files of its first start
        return
    from lorabench.results.record import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)  # two processes may race here: each file is whole or absent
    from lorabench.fingerprint import portable_strings

    overrides = portable_strings(list(job_overrides))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(portable_strings(cfg_dict))))


def run_one(cfg_dict: dict, command: str, multirun: bool, job_overrides: list[str] = ()) -> int:
    """Validate, pre-flight check (lorabench.preflight: shapes on a meta-device model, data files)
    and run one configuration; returns an exit code. Bad input exits 2 before any weight loads.
    Failures inside a sweep are collected for the summary instead of stopping the sweep."""
    label = cfg_dict.get("method", {}).get("label", "?")
    try:
        cfg, spec = build_run(cfg_dict)
        from lorabench.preflight import preflight

        preflight(cfg, spec)
    except USER_ERRORS as exc:
        err(str(exc))
        SWEEP_SUMMARY.append({"run": label, "status": "invalid", "error": str(exc)})
        return 2
    if cfg.hardware.num_processes > 1 and not _under_launcher():
        from lorabench.data.base import forget_preloaded

        forget_preloaded()  # each launched process loads (and checks) its own copy
        code = launch_distributed(cfg, command)
        SWEEP_SUMMARY.append({"run": label, "status": launched_status(cfg, code), "error": None})
        return code
    from lorabench.console import set_progress
    from lorabench.data.base import forget_preloaded
    from lorabench.train import RunCanceled, train

    set_progress(cfg.progress)
    write_hydra_files(dataclasses.asdict(cfg), job_overrides)
    try:
        record = train(cfg, spec, command)
    except (RunCanceled, KeyboardInterrupt) as exc:
        err(f"run canceled ({exc}); the record says so")
        raise SystemExit(130) from None
    except USER_ERRORS as exc:
        err(str(exc))
        SWEEP_SUMMARY.append({"run": label, "status": "failed", "error": str(exc)})
        return 2
    except Exception as exc:  # noqa: BLE001 - the record holds the traceback
        err(f"run failed: {type(exc).__name__}: {exc}")
        SWEEP_SUMMARY.append({"run": label, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        forget_preloaded()
    SWEEP_SUMMARY.append(
        {"run": record["run_id"], "status": "skipped" if record.get("skipped") else record["status"], "error": None}
    )
    return 0
