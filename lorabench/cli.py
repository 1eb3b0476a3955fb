"""The ``lorabench`` command: the only module that sees a Hydra ``DictConfig``.

lorabench train [hydra overrides...]     one run, or a sweep with -m
lorabench table [--format md|csv|json|latex|html]  comparison table of the records
lorabench methods                        registered method presets and components
lorabench plot [--x F] [--y F]           Pareto fronts, training and rank curves (PNG, SVG)
lorabench report [--out FILE]            one static HTML page of tables and plots
lorabench reproduce <recipe> [scale=smoke]  a paper's grid, ours beside theirs
lorabench status [--state S]             runs by state: running, stale (owner gone), failed, canceled, completed
lorabench export RUN [--merge] [--out DIR]  a completed run as a folder plain transformers loads (verified)
lorabench tune [overrides...] [--start LR]  one configuration's learning rate: ladder search or pruned Optuna
lorabench --version                      the installed version
eval "$(lorabench -sc install=bash)"     shell completion of commands and of train's overrides (Hydra's)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from lorabench.errors import ConfigError, DataError, ModelSourceError
from lorabench.results.runs import status_command

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
USER_ERRORS = (ConfigError, DataError, ModelSourceError)
SWEEP_SUMMARY: list[dict] = []


def _err(message: str) -> None:
    print(f"lorabench: error: {message}", file=sys.stderr)


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
    if task.head == "causal_lm" and cfg.model.architecture != "decoder":
        raise ConfigError(
            f"dataset={cfg.dataset.name!r} needs a decoder model (generation); model={cfg.model.name!r} "
            f"is an {cfg.model.architecture}"
        )
    try:
        check_method(dict(cfg.method))
    except ConfigError as exc:  # a Params type error: say which key (OmegaConf's first line does not)
        key = getattr(exc.__context__, "full_key", None)
        if key and f"method.{key}" not in str(exc):
            raise ConfigError(f"{exc} (at method.{key})") from None
        raise
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


# -- train ------------------------------------------------------------------------------------------
def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCHED" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def launch_distributed(cfg, command: str) -> int:
    """Re-launch this run under ``accelerate launch`` with the resolved config (every rank then
    agrees on the run id), instead of letting each rank compose Hydra configs itself."""
    from lorabench.results.record import run_id

    cfg_dict = dataclasses.asdict(cfg)
    run_dir = Path(cfg.results_dir) / run_id(cfg_dict)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "launch_config.json"
    config_path.write_text(json.dumps({"config": cfg_dict, "command": command}, indent=2))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(cfg.hardware.num_processes),
        "--num_machines",
        "1",
        "--multi_gpu",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        cfg.hardware.mixed_precision,
        "-m",
        "lorabench.worker",
        str(config_path),
    ]
    print(f"[lorabench] launching {cfg.hardware.num_processes} processes: {shlex.join(launch[2:])}")
    env = {**os.environ, "ACCELERATE_LAUNCHED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
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
    from lorabench.fingerprint import portable_config, portable_override

    overrides = [portable_override(o) for o in job_overrides]
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(portable_config(cfg_dict))))


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
        _err(str(exc))
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
        _err(f"run canceled ({exc}); the record says so")
        raise SystemExit(130) from None
    except USER_ERRORS as exc:
        _err(str(exc))
        SWEEP_SUMMARY.append({"run": label, "status": "failed", "error": str(exc)})
        return 2
    except Exception as exc:  # noqa: BLE001 - the record holds the traceback
        _err(f"run failed: {type(exc).__name__}: {exc}")
        SWEEP_SUMMARY.append({"run": label, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        forget_preloaded()
    SWEEP_SUMMARY.append(
        {"run": record["run_id"], "status": "skipped" if record.get("skipped") else record["status"], "error": None}
    )
    return 0


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


def train_command(argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from lorabench.config_store import register_schemas

    register_schemas()
    check_overrides(argv)
    SWEEP_SUMMARY.clear()
    command = "lorabench train " + shlex.join(argv)
    codes: list[int] = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _task(cfg) -> float | None:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        cfg_dict = OmegaConf.to_container(cfg, resolve=True)
        cfg_dict["results_dir"] = results_dir_of(cfg_dict["results_dir"], list(hydra_cfg.overrides.hydra), multirun)
        job_overrides = list(hydra_cfg.overrides.task)
        if multirun:
            print(f"[lorabench] sweep job #{hydra_cfg.job.num}: {' '.join(job_overrides) or '(defaults)'}")
        code = run_one(cfg_dict, command, multirun, job_overrides)
        codes.append(code)
        if code and not multirun:
            raise SystemExit(code)
        from lorabench.tuning.runs import run_objective

        return run_objective(cfg_dict)  # a sweeper's objective (hydra/sweeper=lr_optuna): the primary metric

    completing = any(arg in COMPLETION_FLAGS or arg.startswith(COMPLETION_FLAGS) for arg in argv)
    sys.argv = ["lorabench" if completing else "lorabench train", *argv]  # completion installs for `lorabench`
    _task()
    if len(SWEEP_SUMMARY) > 1:
        print("\n[lorabench] sweep summary:")
        for row in SWEEP_SUMMARY:
            print(f"  {row['status']:>9}  {row['run']}" + (f"  ({row['error']})" if row["error"] else ""))
    return max(codes, default=0)


# -- table / methods --------------------------------------------------------------------------------
def _split_keys(values) -> list[str]:
    return [k for v in values or [] for k in v.split(",") if k]


def table_command(argv: list[str]) -> int:
    from lorabench.results.table import FORMATS, build_table

    parser = argparse.ArgumentParser(prog="lorabench table", description="Comparison table of run records.")
    parser.add_argument("--results-dir", default="results/runs", help="folder searched for record.json files")
    parser.add_argument("--format", default="md", choices=FORMATS)
    parser.add_argument("--method", action="append", help="keep only these method labels (repeatable)")
    parser.add_argument("--model", action="append", help="keep only these models (repeatable)")
    parser.add_argument("--dataset", action="append", help="keep only these datasets (repeatable)")
    parser.add_argument(
        "--group-by",
        action="append",
        metavar="KEY",
        help="extra row keys: dotted config paths, e.g. method.rank (repeatable or comma-separated)",
    )
    parser.add_argument(
        "--vs-paper",
        metavar="RECIPE",
        help="add the paper's number and ours minus theirs from a recipe (verified numbers only)",
    )
    parser.add_argument(
        "--include-unverified", action="store_true", help="with --vs-paper: also show second-hand numbers, marked †"
    )
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        _err(f"--results-dir {args.results_dir!r} does not exist")
        return 2
    paper = _paper_numbers(args.vs_paper, args.include_unverified)
    text, problems = build_table(
        Path(args.results_dir),
        args.format,
        args.method,
        args.model,
        args.dataset,
        group_by=_split_keys(args.group_by),
        paper=paper,
    )
    for path, problem in problems:
        print(f"lorabench: skipped {path}: {problem}", file=sys.stderr)
    print(text)
    return 0


def _paper_numbers(recipe: str | None, include_unverified: bool):
    """A recipe's paper numbers for --vs-paper (None without a recipe). Raises ConfigError."""
    if not recipe:
        return None
    from lorabench.reproduce import load_recipe, paper_entries

    return paper_entries(load_recipe(recipe), include_unverified)


def plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorabench plot",
        description="Figures from run records: Pareto fronts, training curves, rank curves.",
        epilog="Fields: metric, peak_mem, params, opt_state, tokens_per_s, train_time, wall_time, adapter_bytes, "
        "intruders, or a dotted record path (cost.train_time_s, config.method.rank).",
    )
    parser.add_argument("--results-dir", default="results/runs", help="folder searched for record.json files")
    parser.add_argument("--out", default="results/plots", help="folder the figures are written to")
    parser.add_argument(
        "--kind",
        action="append",
        choices=("pareto", "curves", "ranks"),
        help="which figures (repeatable; default: all three)",
    )
    parser.add_argument("--x", action="append", help="Pareto x field(s) (repeatable; default peak_mem)")
    parser.add_argument("--y", default="metric", help="Pareto y field (default: the primary metric)")
    parser.add_argument("--format", action="append", choices=("png", "svg"), help="default: png and svg")
    parser.add_argument("--method", action="append", help="keep only these method labels (repeatable)")
    parser.add_argument("--model", action="append", help="keep only these models (repeatable)")
    parser.add_argument("--dataset", action="append", help="keep only these datasets (repeatable)")
    parser.add_argument("--group-by", action="append", metavar="KEY", help="extra variant keys, e.g. method.rank")
    args = parser.parse_args(argv)
    from lorabench.results import plot
    from lorabench.results.table import collect

    if not Path(args.results_dir).is_dir():
        _err(f"--results-dir {args.results_dir!r} does not exist")
        return 2
    records, problems, _ = collect(Path(args.results_dir), args.method, args.model, args.dataset)
    for path, problem in problems:
        print(f"lorabench: skipped {path}: {problem}", file=sys.stderr)
    if not records:
        _err(f"no completed records under {args.results_dir}")
        return 1
    kinds = args.kind or ["pareto", "curves", "ranks"]
    formats = tuple(args.format or plot.FORMATS)
    group_by = tuple(_split_keys(args.group_by))
    out = Path(args.out)
    written = []
    try:
        for x in (args.x or ["peak_mem"]) if "pareto" in kinds else []:
            plot.field_spec(x), plot.field_spec(args.y)
            name = f"pareto_{args.y}_vs_{x}".replace(".", "-").replace("/", "-")
            paths, points = plot.plot_pareto(records, out / name, x, args.y, group_by, formats)
            written += paths
            for panel, pts in points.items():
                front = ", ".join(p.label for p in pts if p.front)
                print(f"[lorabench] {panel}: {len(pts)} points; Pareto front: {front or '-'}")
    except ValueError as exc:
        _err(str(exc))
        return 2
    if "curves" in kinds:
        for record in records:
            written += plot.plot_curves(record, out / "curves", formats)
    if "ranks" in kinds:
        written += plot.plot_rank_curves(records, out / "rank_curves", formats)
    for path in written:
        print(f"  wrote {path}")
    return 0


def report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorabench report", description="One static, offline HTML page: tables and plots of a results folder."
    )
    parser.add_argument("--results-dir", default="results/runs", help="folder searched for record.json files")
    parser.add_argument("--out", default=None, help="HTML file to write (default: <results-dir>/report.html)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--group-by", action="append", metavar="KEY", help="extra row keys, e.g. method.rank")
    parser.add_argument("--vs-paper", metavar="RECIPE", help="add a recipe's verified paper numbers to the table")
    args = parser.parse_args(argv)
    from lorabench.results.report import write_report

    if not Path(args.results_dir).is_dir():
        _err(f"--results-dir {args.results_dir!r} does not exist")
        return 2
    paper = _paper_numbers(args.vs_paper, include_unverified=False)
    out = Path(args.out) if args.out else Path(args.results_dir) / "report.html"
    path, problems = write_report(
        Path(args.results_dir), out, title=args.title, group_by=_split_keys(args.group_by), paper=paper
    )
    for p, problem in problems:
        print(f"lorabench: skipped {p}: {problem}", file=sys.stderr)
    print(f"[lorabench] report: {path}")
    return 0


def reproduce_command(argv: list[str]) -> int:
    from lorabench.reproduce import reproduce_command as run

    try:
        return run(argv)
    except ConfigError as exc:
        _err(str(exc))
        return 2


def export_command(argv: list[str]) -> int:
    """``lorabench export RUN [--merge] [--out DIR]``: lorabench.export (a verified, loadable folder)."""
    from lorabench.export import main as run

    return run(argv)


def methods_command(argv: list[str]) -> int:
    from lorabench.methods.catalog import fidelity_rows, method_rows

    parser = argparse.ArgumentParser(prog="lorabench methods", description="Registered method presets.")
    parser.add_argument(
        "--fidelity",
        action="store_true",
        help="one row per component: agreement with the authors' code (status, reference, tolerance, deviations)",
    )
    args = parser.parse_args(argv)
    if args.fidelity:
        rows = fidelity_rows(CONF_DIR / "method")
        header = ("preset", "component", "status", "reference", "tolerance", "deviations / unchecked")
    else:
        rows = method_rows(CONF_DIR / "method")
        header = ("preset", "family", "backed by", "size knob (budget)", "components", "paper")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def tune_command(argv: list[str]) -> int:
    from lorabench.tuning.command import tune_command as run

    return run(argv)


COMPLETION_FLAGS = ("-sc", "--shell-completion")


def lorabench_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorabench")
    except PackageNotFoundError:
        return "unknown (not installed)"


def completion_command(argv: list[str]) -> int:
    """Hydra's shell completion for ``lorabench``: ``eval "$(lorabench -sc install=bash)"`` (or
    ``lorabench train -sc install=bash``) installs it; the shell then runs ``lorabench -sc query=bash``
    with the line typed so far in ``COMP_LINE``. The first word after ``lorabench`` completes to a
    command; the words after ``train`` complete as Hydra completes an app's overrides."""
    line = os.environ.get("COMP_LINE")
    if line is None or not any(a.startswith("query") for a in argv[1:]):
        return train_command(argv)  # install / uninstall: Hydra writes the script
    words = line.split()
    if len(words) == 1 or (len(words) == 2 and not line.endswith(" ")):
        typed = words[1] if len(words) == 2 else ""
        print(" ".join(name for name in COMMANDS if name.startswith(typed)))
        return 0
    if words[1] != "train":
        return 0  # the other commands take argparse options; the shell completes file names
    os.environ["COMP_LINE"] = line.replace(" train", "", 1)  # Hydra strips the app name, then completes
    return train_command(argv)


COMMANDS = {
    "train": train_command,
    "table": table_command,
    "methods": methods_command,
    "plot": plot_command,
    "report": report_command,
    "reproduce": reproduce_command,
    "status": status_command,
    "export": export_command,
    "tune": tune_command,
}
USAGE = """usage: lorabench <command> [args]

commands:
  train      run one experiment, or a sweep with -m (Hydra overrides: method=galore dataset=sst2 ...)
             `lorabench train --help` lists the config groups and options; sweep presets: +sweep=seeds
  table      comparison table of the run records (md, csv, latex or html; --group-by, --vs-paper)
  methods    registered method presets: family, backing library, paper (--fidelity: agreement with
             the authors' code per component)
  plot       Pareto fronts (metric vs memory/params/...), loss and eval curves, rank curves (PNG, SVG)
  report     one static offline HTML page with the tables and plots of a results folder
  reproduce  run a paper recipe (recipes/<name>/recipe.yaml) and print ours beside theirs
  status     runs by state: running, stale (the record says running, its owner is gone), failed,
             canceled, completed; with step, owner and age
  export     a completed run as a folder plain transformers loads (--merge folds the adapter in;
             without it: the peft or lorabench adapter), verified on a probe batch (export.json)
  tune       tune one configuration's learning rate (Hydra overrides as for train): the ladder search
             with edge extension (the leaderboard's rule), or --search optuna (pruned); summary in
             results_dir/tuning/. Unpruned Optuna via Hydra: train -m hydra/sweeper=lr_optuna

examples:
  lorabench train method=galore
  lorabench train method=lora method.rank=16 dataset=sst2 model=minilm_l6 train.max_steps=200
  lorabench train -m method=full,lora,galore seed=0,1
  lorabench table --format csv --group-by method.rank
  lorabench plot --x peak_mem --x params
  lorabench reproduce galore_glue_roberta scale=smoke data_root=path/to/glue

also: lorabench --version; eval "$(lorabench -sc install=bash)" installs shell completion
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lorabench.console import quiet_libraries

    quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0)
    if argv[0] in ("--version", "-V"):
        print(f"lorabench {lorabench_version()}")
        raise SystemExit(0)
    if argv[0] in COMPLETION_FLAGS or argv[0].startswith(COMPLETION_FLAGS):
        raise SystemExit(completion_command(argv))
    command = COMMANDS.get(argv[0])
    if command is None:
        _err(f"unknown command {argv[0]!r}; valid choices: {', '.join(COMMANDS)}")
        raise SystemExit(2)
    try:
        code = command(argv[1:])
    except USER_ERRORS as exc:  # bad input to table / plot / report / reproduce
        _err(str(exc))
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
