"""``lorabench tune <overrides...> [options]``: tune one configuration's learning rate.

The positional arguments are the Hydra overrides of ``lorabench train`` (the configuration whose
rate is tuned); the options are the search's, kept out of the Hydra config because a ``tune.*``
node there would enter every run's config, and so its run id. ``--search ladder`` (default) is the
leaderboard's rule; ``--search optuna`` the pruned Optuna search.
"""

from __future__ import annotations

import argparse

from lorabench.tuning.halving import PRUNERS, OptunaSearch, optuna_tune, write_optuna_summary
from lorabench.tuning.ladder import LR_LADDER, MAX_EDGE_STEPS
from lorabench.tuning.search import LadderSearch, print_result, tune, write_summary

EPILOG = """examples:
  lorabench tune method=lora model=minilm_l6 dataset=sst2 train.max_steps=250 --start 5e-4
  lorabench tune method=vera dataset=sst2 --start 5e-3 --extra 2e-2,5e-2 --max-edge-steps 3
  lorabench tune method=lora dataset=sst2 --search optuna --trials 12 --rungs 3 --reduction-factor 3

Runs go to results_dir/<run_id> like any `lorabench train` run (completed ones are skipped, so a
search resumes); the summary to results_dir/tuning/<name>.md and .json."""


def rates(text: str) -> tuple[float, ...]:
    """``1e-4,5e-4`` -> (1e-4, 5e-4)."""
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of learning rates") from None


def tune_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorabench tune",
        description="Tune the learning rate of one configuration: the ladder search with edge extension "
        "(the leaderboard's rule), or a pruned Optuna search.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the configuration (as for lorabench train)")
    parser.add_argument("--search", choices=("ladder", "optuna"), default="ladder")
    parser.add_argument("--metric", default=None, help="final metric to optimize (default: the dataset's primary)")
    parser.add_argument("--jobs", type=int, default=0, help="0: runs in this process (default); N: N worker processes")
    ladder = parser.add_argument_group("ladder search")
    ladder.add_argument("--start", type=float, default=None, help="start rate (default: the configuration's train.lr)")
    ladder.add_argument("--extra", type=rates, default=(), help="more start rates, comma-separated")
    ladder.add_argument(
        "--ladder", type=rates, default=LR_LADDER, help="the rates extension steps along, comma-separated"
    )
    ladder.add_argument(
        "--max-edge-steps", type=int, default=MAX_EDGE_STEPS, help="edge extensions at most (default 2)"
    )
    ladder.add_argument(
        "--steps-up", type=int, default=1, help="a one-rate start grid adds the rate this many rungs up"
    )
    ladder.add_argument(
        "--dry-run", action="store_true", help="show the grid and pick from existing records; run nothing"
    )
    optuna = parser.add_argument_group("optuna search (TPE over log-uniform train.lr, successive-halving rungs)")
    optuna.add_argument("--trials", type=int, default=OptunaSearch.trials)
    optuna.add_argument("--low", type=float, default=OptunaSearch.low)
    optuna.add_argument("--high", type=float, default=OptunaSearch.high)
    optuna.add_argument("--rungs", type=int, default=OptunaSearch.rungs, help="training budgets per trial")
    optuna.add_argument("--reduction-factor", type=int, default=OptunaSearch.reduction_factor, help="eta")
    optuna.add_argument("--pruner", choices=PRUNERS, default=OptunaSearch.pruner)
    optuna.add_argument("--sampler-seed", type=int, default=OptunaSearch.seed, help="TPE's seed (runs keep seed=...)")
    args = parser.parse_intermixed_args(argv)
    if args.search == "optuna":
        search = OptunaSearch(
            args.trials, args.low, args.high, args.rungs, args.reduction_factor, args.pruner, args.sampler_seed
        )
        result = optuna_tune(args.overrides, search, args.jobs, args.metric)
        md, _ = write_optuna_summary(result, argv)
        best = result.best
        print(f"[lorabench tune] pick: {best['lr']:.3g}" if best else "[lorabench tune] pick: - (no trial completed)")
        print(f"[lorabench tune] summary: {md}")
        return 0 if best else 1
    search = LadderSearch(args.start, args.extra, args.ladder, args.max_edge_steps, args.steps_up)
    result = tune(args.overrides, search, args.jobs, args.metric, dry_run=args.dry_run)
    print_result(result)
    if args.dry_run:
        return 0
    md, _ = write_summary(result, argv)
    print(f"[lorabench tune] summary: {md}")
    if result.failures:
        print(f"[lorabench tune] failures: {result.failures}")
    return 1 if result.failures or result.pick is None else 0
