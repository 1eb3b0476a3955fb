"""What a learning-rate search costs: the leaderboard's ladder against a pruned Optuna search, on Track A.

    .venv/bin/python scripts/sweep_cost.py run --methods lora,dora,vera,galore   # the Optuna searches
    .venv/bin/python scripts/sweep_cost.py table                                 # README.md from the records

``run`` tunes each method's Track A configuration (``scripts/leaderboard.py``'s protocol: minilm_l6 on
the 4,000-sentence SST-2 subset, 250 steps, seed 0) with ``lorabench tune --search optuna`` at its
defaults: 12 TPE trials over log-uniform [1e-5, 1e-1], successive halving over 3 rungs of factor 3
(27, 83 and 250 steps, each rung its own run). Two methods run at a time, each through a pool of two
one-thread workers of which it uses one: two one-thread runs share the machine, as in the Track A
sweep (``--jobs 2``), so the runs' wall times compare with the ladder's records.

``table`` reads both searches' records and prints a Markdown table: per method, the runs, training
steps and run wall time (train + evaluation, from each record's ``cost.wall_time_s``) of the ladder
(the seed-0 points of ``results/leaderboard/sweep``, the grid ``scripts/leaderboard.py`` grew) and of
the Optuna search, and the two picks with their seed-0 SST-2 dev accuracy. The ladder's records were
timed in other sessions under other loads, so its CPU hours are also given re-timed: its number of
runs times this search's mean wall time of a whole (250-step) run; the ratio uses the re-timed hours.
The picks agree when they are at most one ladder step apart (a factor 2.5 or less: 1e-3, 2e-3 and
5e-3 are neighbours).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import leaderboard  # noqa: E402  (scripts/leaderboard.py: Track A's protocol and its sweep)

DATA_DIR = "../shared/data/glue/SST-2"
SWEEP_DIR = Path("results/leaderboard/sweep")
OUT = Path("results/sweep_cost")
AGREE_FACTOR = 2.5  # the widest gap between neighbouring rates of lorabench.tuning.LR_LADDER
OPTUNA_ARGS = ["--search", "optuna", "--jobs", "2"]  # the search's own defaults otherwise


def tune_argv(method: str, out: Path, data_dir: str) -> list[str]:
    """``lorabench tune`` of the method's Track A configuration, its runs under ``out/runs``."""
    task = leaderboard.overrides(
        method, leaderboard.FAMILY_LR.get(method, leaderboard.DEFAULT_LR), 0, out / "runs", data_dir
    )
    return [sys.executable, "-m", "lorabench.cli", "tune", *task, *OPTUNA_ARGS]


def run_searches(methods: list[str], out: Path, data_dir: str, parallel: int) -> int:
    """The Optuna searches, ``parallel`` methods at a time; each one's log in ``out/logs``."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    failed = 0
    for start in range(0, len(methods), parallel):
        group = methods[start : start + parallel]
        procs, start_s = [], time.perf_counter()
        for method in group:
            log = open(out / "logs" / f"{method}.log", "w")
            argv = tune_argv(method, out, data_dir)
            procs.append((method, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
        for method, proc, log in procs:
            code = proc.wait()
            log.close()
            elapsed = time.perf_counter() - start_s
            (out / "logs" / f"{method}.json").write_text(json.dumps({"exit": code, "elapsed_s": elapsed}))
            print(f"[sweep_cost] {method}: exit {code} after {elapsed:.0f} s", flush=True)
            failed += code != 0
    return failed


def ladder_cost(method: str, sweep_dir: Path, data_dir: str) -> dict:
    """The ladder's points for ``method``: rate -> (accuracy, wall s, steps), and its pick."""
    from lorabench.results.record import iter_records
    from lorabench.tuning import pick_lr

    points = leaderboard.sweep_results(sweep_dir, [method], data_dir).get(method, {})
    runs = {}
    for _, record, _ in iter_records(sweep_dir):
        if record is None or record["status"] != "completed" or record["config"]["method"]["label"] != method:
            continue
        lr = record["config"]["train"]["lr"]
        if lr in points and record["config"]["seed"] == 0:
            runs[lr] = record
    return {
        "runs": len(runs),
        "steps": sum(r["config"]["train"]["max_steps"] for r in runs.values()),
        "wall_s": sum(r["cost"]["wall_time_s"] for r in runs.values()),
        "points": points,
        "pick": pick_lr(points) if points else None,
    }


def optuna_cost(method: str, out: Path) -> dict:
    """The Optuna search's runs and pick for ``method``, from its summary and records."""
    summaries = sorted((out / "runs" / "tuning").glob(f"{method}-sst2-*-optuna-*.json"))
    if not summaries:
        return {}
    summary = json.loads(summaries[-1].read_text())
    ids = [r["run_id"] for t in summary["trials"] for r in t["rungs"] if r["run_id"]]
    records = [json.loads((out / "runs" / rid / "record.json").read_text()) for rid in ids]
    best = max(
        (t for t in summary["trials"] if t["state"] == "COMPLETE"),
        key=lambda t: (t["rungs"][-1]["metric"], -t["number"]),
        default=None,
    )
    last = summary["rung_steps"][-1]
    full = [r["cost"]["wall_time_s"] for r in records if r["config"]["train"]["max_steps"] == last]
    return {
        "runs": len(records),
        "steps": sum(r["config"]["train"]["max_steps"] for r in records),
        "wall_s": sum(r["cost"]["wall_time_s"] for r in records),
        "full_run_s": sum(full) / len(full) if full else None,  # a whole run's wall time in this search
        "trials": len(summary["trials"]),
        "pruned": sum(t["state"] == "PRUNED" for t in summary["trials"]),
        "full_runs": sum(t["state"] == "COMPLETE" for t in summary["trials"]),
        "pick": best["lr"] if best else None,
        "pick_metric": best["rungs"][-1]["metric"] if best else None,
        "summary": str(summaries[-1].relative_to(out)),
    }


def agree(a: float | None, b: float | None) -> bool | None:
    """Whether two rates are at most one ladder step apart."""
    if a is None or b is None:
        return None
    return abs(math.log(a / b)) <= math.log(AGREE_FACTOR) + 1e-9


HEADER = (
    "method",
    "ladder runs",
    "ladder steps",
    "ladder CPU h (its records)",
    "ladder CPU h (re-timed)",
    "Optuna runs",
    "Optuna steps",
    "Optuna CPU h",
    "ladder pick: dev acc",
    "Optuna pick: dev acc",
    "picks agree",
    "Optuna / ladder CPU h",
)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _cost_cells(part: dict, runs: str | None = None) -> list[str]:
    return [runs or str(part["runs"]), f"{part['steps']:,}", f"{part['wall_s'] / 3600:.2f}"]


def retimed_s(ladder: dict, optuna: dict) -> float | None:
    """The ladder's runs at this search's wall time of a whole run (the records of both searches were
    timed in different sessions under different loads; a run's time barely depends on its rate)."""
    return ladder["runs"] * optuna["full_run_s"] if optuna.get("full_run_s") else None


def table(methods: list[str], out: Path, sweep_dir: Path, data_dir: str) -> str:
    rows, totals = [], {"ladder": [0, 0, 0.0], "optuna": [0, 0, 0.0]}
    for method in methods:
        lad, opt = ladder_cost(method, sweep_dir, data_dir), optuna_cost(method, out)
        if not opt:
            rows.append(_row([method, *_cost_cells(lad), *["-"] * 8]))
            continue
        retimed = retimed_s(lad, opt)
        for key, part in (("ladder", {**lad, "wall_s": retimed}), ("optuna", opt)):
            totals[key] = [
                totals[key][0] + part["runs"],
                totals[key][1] + part["steps"],
                totals[key][2] + part["wall_s"],
            ]
        verdict = {True: "yes", False: "no", None: "-"}[agree(lad["pick"], opt["pick"])]
        rows.append(
            _row(
                [
                    method,
                    *_cost_cells(lad),
                    f"{retimed / 3600:.2f}",
                    *_cost_cells(opt, f"{opt['runs']} ({opt['trials']} trials, {opt['pruned']} pruned)"),
                    f"{lad['pick']:g}: {100 * lad['points'][lad['pick']]:.2f}",
                    f"{opt['pick']:.3g}: {100 * opt['pick_metric']:.2f}",
                    verdict,
                    f"{opt['wall_s'] / retimed:.2f}",
                ]
            )
        )
    (lr, ls, lw), (orr, os_, ow) = totals["ladder"], totals["optuna"]
    if lw:
        rows.append(
            _row(
                [
                    "**all**",
                    lr,
                    f"{ls:,}",
                    "",
                    f"{lw / 3600:.2f}",
                    orr,
                    f"{os_:,}",
                    f"{ow / 3600:.2f}",
                    "",
                    "",
                    "",
                    f"{ow / lw:.2f}",
                ]
            )
        )
    return "\n".join([_row(list(HEADER)), "|" + "---|" * len(HEADER), *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--methods", default="lora,dora,vera,galore")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--sweep-dir", type=Path, default=SWEEP_DIR)
    parser.add_argument("--parallel", type=int, default=2, help="methods searched at a time")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if args.action == "run":
        return 1 if run_searches(methods, args.out, args.data_dir, args.parallel) else 0
    print(table(methods, args.out, args.sweep_dir, args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
