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
lorabench bench [overrides] [--methods M]  step cost per method, harness vs a raw loop (lorabench.bench)
lorabench --version                      the installed version
eval "$(lorabench -sc install=bash)"     shell completion of commands and of train's overrides (Hydra's)

Argument parsing and the command functions only: the launcher they share with ``tune``,
``reproduce`` and the worker is lorabench.launch, the config checks lorabench.validate.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lorabench.errors import ConfigError
from lorabench.launch import CONF_DIR, SWEEP_SUMMARY, USER_ERRORS, results_dir_of, run_one
from lorabench.launch import err as _err
from lorabench.results.runs import status_command
from lorabench.validate import check_overrides


# -- train ------------------------------------------------------------------------------------------
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
    parser.add_argument(
        "--protocol",
        default="single",
        choices=("single", "federated", "continual", "compose", "compressed"),
        help="which protocol's runs: each has its own columns (default: single runs)",
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
        protocol=args.protocol,
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
    parser.add_argument(
        "--protocol",
        default="single",
        choices=("single", "federated", "continual"),
        help="which protocol's runs (default: single runs); curves are per round or per stage there",
    )
    args = parser.parse_args(argv)
    from lorabench.results import plot
    from lorabench.results.table import collect

    if not Path(args.results_dir).is_dir():
        _err(f"--results-dir {args.results_dir!r} does not exist")
        return 2
    records, problems, _ = collect(Path(args.results_dir), args.method, args.model, args.dataset, args.protocol)
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
    from lorabench.methods.catalog import fidelity_rows, method_rows, strategy_rows

    parser = argparse.ArgumentParser(prog="lorabench methods", description="Registered method presets.")
    parser.add_argument(
        "--fidelity",
        action="store_true",
        help="one row per component: agreement with the authors' code (status, reference, tolerance, deviations)",
    )
    parser.add_argument(
        "--strategies",
        action="store_true",
        help="one row per preset: can it run under each hardware.strategy, the two-process check, and why not",
    )
    args = parser.parse_args(argv)
    if args.fidelity:
        rows = fidelity_rows(CONF_DIR / "method")
        header = ("preset", "component", "status", "reference", "tolerance", "deviations / unchecked")
    elif args.strategies:
        from lorabench.distributed import STRATEGIES

        rows = strategy_rows(CONF_DIR / "method")
        header = ("preset", *STRATEGIES, "two-process check", "why not")
    else:
        rows = method_rows(CONF_DIR / "method")
        header = ("preset", "family", "backed by", "size knob (budget)", "components", "paper")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def bench_command(argv: list[str]) -> int:
    from lorabench.bench import bench_command as run

    return run(argv)


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
    "bench": bench_command,
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
  bench      per method: step time, tokens/s, FLOP/s and its share of a matmul peak, peak memory,
             optimizer state (measured and analytic), the harness's overhead over a raw loop

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
    from lorabench.distributed import end_world_of_one

    end_world_of_one()  # a LOCAL_RANK a one-process FSDP/ZeRO run set (here or in a parent) is not a launch's

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
