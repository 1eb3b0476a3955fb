"""Optuna learning-rate search, pruned by successive halving over training steps (``lorabench tune --search optuna``).

Each trial is one learning rate that Optuna's TPE sampler proposes, log-uniform in [low, high]
(seeded: a rerun proposes the same rates, so its finished runs are skipped). A trial climbs rungs:
it trains for b_0 < b_1 < ... < b_{R-1} = S steps, b_k = floor(S / eta^(R-1-k)), S the
configuration's ``train.max_steps``. Each rung is a separate, complete lorabench run (its own run id
and record; its warm-up and decay span its own b_k steps), so a rung's score is the metric after a
shorter training, not an evaluation midway through the long one. After each rung below the last
the trial reports that score to Optuna at step b_k and asks the pruner whether to go on:

- ``halving`` (default): ``optuna.pruners.SuccessiveHalvingPruner`` (asynchronous successive
  halving, ASHA; Li et al. 2020, arXiv:1810.05934) with ``min_resource=b_0`` and
  ``reduction_factor=eta``: a trial goes on past rung k only if its score is within the top 1/eta
  of the scores of every trial that reached rung k so far (while fewer than eta have, only if it
  is the best of them).
- ``median``: ``optuna.pruners.MedianPruner`` (Optuna's defaults: after 5 completed trials): stops
  a trial whose score at b_k is worse than the median of the completed trials' scores at b_k.
- ``none``: no pruning, one rung: every trial trains the full S steps.

What prunes what: the pruner stops a learning rate after a shorter run, so its longer runs never
start; that is the compute saved. A trial that goes on retrains from scratch at the next rung
(lorabench's training loop has no hook to stop a run midway and continue it later), so a trial
that reaches the top costs b_0 + ... + b_{R-1} steps. The pick is the completed trial with the
best score at S (ties: the earlier trial). The study lives in memory; the records are what persists.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from lorabench.errors import ConfigError
from lorabench.tuning.runs import DESCRIBE_KEYS, final_metric, read_if_completed, run_tasks
from lorabench.tuning.search import TUNING_DIR, Target, prepare, summary_head, summary_name

PRUNERS = ("halving", "median", "none")


@dataclasses.dataclass(frozen=True)
class OptunaSearch:
    """Settings: trials, the log-uniform range, rungs and their factor eta, pruner, sampler seed."""

    trials: int = 12
    low: float = 1e-5
    high: float = 1e-1
    rungs: int = 3
    reduction_factor: int = 3
    pruner: str = "halving"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r} is invalid; valid choices: {', '.join(PRUNERS)}")
        if self.trials < 1:
            raise ConfigError(f"--trials {self.trials} is invalid; it must be >= 1")
        if not 0 < self.low < self.high:
            raise ConfigError(f"--low {self.low:g} / --high {self.high:g} are invalid; they need 0 < low < high")
        if self.rungs < 1 or self.reduction_factor < 2:
            raise ConfigError(
                f"--rungs {self.rungs} / --reduction-factor {self.reduction_factor} are invalid; "
                "they need rungs >= 1 and reduction factor >= 2"
            )


def rung_steps(max_steps: int, rungs: int, reduction_factor: int) -> list[int]:
    """The training steps of each rung: floor(S / eta^(R-1-k)) for k = 0 .. R-1 (the last is S);
    raises ConfigError when the first rung would have no step."""
    steps = [max_steps // reduction_factor ** (rungs - 1 - k) for k in range(rungs)]
    if steps[0] < 1:
        raise ConfigError(
            f"train.max_steps={max_steps} is too short for {rungs} rungs of factor {reduction_factor} "
            f"(the first would train {max_steps}/{reduction_factor}^{rungs - 1} < 1 steps); use fewer rungs"
        )
    return steps


def rung_task(target: Target, lr: float, steps: int) -> list[str]:
    """The overrides of a trial's run at ``lr`` for ``steps`` training steps."""
    kept = [o for o in target.overrides if not o.lstrip("+").startswith("train.max_steps=")]
    return [*kept, f"train.lr={lr}", f"train.max_steps={steps}"]


def import_optuna():
    """``optuna``, without the SQLAlchemy 2 deprecation warning optuna 2.x's import prints (its
    database storage, which this search does not use)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*declarative_base", category=DeprecationWarning)
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                "--search optuna needs the optuna package: pip install hydra-optuna-sweeper (it brings optuna)"
            ) from None
    return optuna


def _pruner(search: OptunaSearch, first_rung: int):
    optuna = import_optuna()

    if search.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first_rung, reduction_factor=search.reduction_factor, min_early_stopping_rate=0
        )
    if search.pruner == "median":
        return optuna.pruners.MedianPruner()
    return optuna.pruners.NopPruner()


@dataclasses.dataclass
class OptunaResult:
    target: Target
    search: OptunaSearch
    steps: list[int]
    trials: list[dict]  # number, lr, state, rungs: [{steps, metric, run_id}]
    failures: list[str]

    @property
    def best(self) -> dict | None:
        done = [t for t in self.trials if t["state"] == "COMPLETE"]
        if not done:
            return None
        sign = 1 if self.target.higher_is_better else -1
        return max(done, key=lambda t: (sign * t["rungs"][-1]["metric"], -t["number"]))


def optuna_tune(overrides: list[str], search: OptunaSearch = OptunaSearch(), jobs: int = 0, metric: str | None = None):
    """Run the pruned Optuna search on the configuration ``overrides``; returns an ``OptunaResult``."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    target = prepare(overrides, metric)
    max_steps = int(target.config["train"]["max_steps"])
    steps = rung_steps(max_steps, search.rungs if search.pruner != "none" else 1, search.reduction_factor)
    every = target.config["train"].get("eval_every") or 0
    if every > steps[0]:
        raise ConfigError(
            f"train.eval_every={every} is larger than the first rung's {steps[0]} steps; "
            "set train.eval_every=0 (evaluate at the end) or use fewer rungs"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if target.higher_is_better else "minimize",
        sampler=optuna.samplers.TPESampler(seed=search.seed),
        pruner=_pruner(search, steps[0]),
    )
    trials, failures = [], []
    keys = (*DESCRIBE_KEYS, "train.max_steps=")
    for _ in range(search.trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", search.low, search.high, log=True)
        row = {"number": trial.number, "lr": lr, "state": "COMPLETE", "rungs": []}
        for k, budget in enumerate(steps):
            task = rung_task(target, lr, budget)
            failures += run_tasks([task], jobs, log=f"[lorabench tune] trial {trial.number} rung {k}:", keys=keys)
            record = read_if_completed(target.results_dir, task)
            value = final_metric(record, target.metric)
            row["rungs"].append({"steps": budget, "metric": value, "run_id": record["run_id"] if record else None})
            if value is None:
                row["state"] = "FAIL"
                break
            trial.report(value, budget)
            if k < len(steps) - 1 and trial.should_prune():
                row["state"] = "PRUNED"
                break
        if row["state"] == "COMPLETE":
            study.tell(trial, row["rungs"][-1]["metric"])
        else:
            study.tell(trial, state=TrialState[row["state"]])
        trials.append(row)
        print(f"[lorabench tune] trial {trial.number}: lr={lr:.3g} {row['state'].lower()}", flush=True)
    return OptunaResult(target, search, steps, trials, failures)


def write_optuna_summary(result: OptunaResult, argv: list[str] | None = None) -> tuple[Path, Path]:
    """``<results_dir>/tuning/<name>.md`` and ``.json``: every trial's rate, state and rung scores."""
    from lorabench.results.record import write_json_atomic, write_text_atomic

    target, search = result.target, result.search
    settings = dataclasses.asdict(search)
    name = summary_name(target, "optuna", settings)
    best = result.best
    data = {
        **summary_head(
            target,
            "optuna",
            "TPE over log-uniform train.lr; rungs = separate shorter runs; lorabench.tuning.halving",
            argv,
        ),
        **settings,
        "rung_steps": result.steps,
        "trials": result.trials,
        "pick": best["lr"] if best else None,
        "failures": result.failures,
        "train_at_pick": "lorabench train " + shlex.join(rung_task(target, best["lr"], result.steps[-1]))
        if best
        else None,
    }
    header = " | ".join(f"{s} steps" for s in result.steps)
    rows = []
    for t in result.trials:
        cells = [f"{r['metric']:.4f}" if r["metric"] is not None else "failed" for r in t["rungs"]]
        cells += ["-"] * (len(result.steps) - len(cells))
        rows.append(f"| {t['number']} | {t['lr']:.3g} | {t['state'].lower()} | " + " | ".join(cells) + " |")
    pruned = sum(t["state"] == "PRUNED" for t in result.trials)
    lines = [
        f"# Learning-rate tuning (Optuna): {target.name} ({target.metric})",
        "",
        f"Command: `{data['command']}`",
        "",
        f"TPE (seed {search.seed}) over log-uniform [{search.low:g}, {search.high:g}], {search.trials} trial(s); "
        f"pruner {search.pruner} at rungs of {', '.join(map(str, result.steps))} steps (each rung its own run); "
        f"{pruned} trial(s) pruned.",
        "",
        f"| trial | learning rate | state | {header} |",
        "|---|---|---|" + "---|" * len(result.steps),
        *rows,
        "",
        f"Pick: **{best['lr']:.3g}** (trial {best['number']}, {target.metric} {best['rungs'][-1]['metric']:.4f})"
        if best
        else "Pick: - (no trial completed)",
    ]
    if data["train_at_pick"]:
        lines += ["", f"Train at the pick: `{data['train_at_pick']}`"]
    folder = target.results_dir / TUNING_DIR
    md, js = folder / f"{name}.md", folder / f"{name}.json"
    write_json_atomic(js, data)
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md, js
