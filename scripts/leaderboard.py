"""The shipped leaderboard: every method on one fixed benchmark per track, three seeds.

    .venv/bin/python scripts/leaderboard.py                      # Track A (or: make leaderboard)
    .venv/bin/python scripts/leaderboard.py --methods lora full --seeds 0 --out /tmp/lb
    .venv/bin/python scripts/leaderboard.py --track b --hardware gpu   # Track B (make leaderboard-b)

Track A protocol (fixed): minilm_l6 (all-MiniLM-L6-v2), GLUE SST-2, a fixed 4,000-sentence training subset
(subset seed 0), 250 steps of global batch 16 (one epoch), max length 128, linear schedule with 6%
warmup, evaluated once at the end on the full dev set (872). Each method runs at its preset's
paper-default setting, except the GaLore-family optimizers, whose presets carry the authors'
pre-training scale (0.25, gap 200): here they use GaLore's GLUE fine-tuning setting (scale 4,
update_proj_gap 500; GaLore README, "Benchmark 2").

Track B protocol (fixed): smollm2_135m (SmolLM2-135M-Instruct), E2E NLG. The folder's ``trainset.csv``
and ``testset_w_refs.csv`` when present; with only ``devset.csv`` (``../shared/data/e2e``) the dev set
is split by MR (sha256(mr) % 5 == 0 -> evaluation, the record says so). A fixed 160-pair training
subset, 40 steps of global batch 4 (one epoch), max length 128, 6% warm-up, bf16 autocast (as the gpu
preset), then one greedy generation (64 new tokens) for each of a fixed 48 evaluation MRs, scored by
BLEU against all their references. Sized for CPU hours: one adapter run takes about 85 s here with two
runs sharing the 2 cores (the first 100-step, 105-MR fp32 pilot took 19 min); LoRA reaches 58 BLEU
(61 after the pilot's 100 steps of 8). Greedy decoding instead of the LoRA paper's beam 10 keeps the
evaluation affordable. Each method's sweep starts from its Track A pick (``TRACK_B_START``) and the rate two
``LR_LADDER`` steps above (``track_b_grid``), then grows by edge extension as in Track A. BAdam
switches block every step (one pass over its 32 blocks). Same stages as Track A, without the rank
comparison; the optimizer-state budget is ``OPT_BUDGET_MB_B``.

Stages, all resumable (a run whose completed record exists is skipped):

1. ``sweep``: seed 0 at every learning rate of the method's grid (``lr_grid``): the family default
   (``FAMILY_LR``), plus ``EXTRA_LR`` points for methods that did not learn at the family default,
   grown by edge extension: while the pick is the smallest or largest point of a grid of two or
   more, the next rate of ``LR_LADDER`` beyond it is run too (at most ``MAX_EDGE_STEPS`` per method).
   A method without extra points starts from its family default and the next ladder rate above it
   (the neighbour check: one epoch is a short schedule, so the larger rate is the likelier win); if the
   default wins, edge extension then tries the rate below it. Records go to ``<out>/sweep``;
   ``<out>/sweep.md`` lists every point and the pick. The rules are ``lorabench.tuning.ladder``'s;
   ``lorabench tune`` runs the same search for one configuration.
2. ``main``: seeds 0, 1, 2 at the picked learning rate (highest dev accuracy at seed 0; ties go to
   the smaller rate). The seed-0 run is the sweep run itself (same run id), copied, not rerun.
3. ``budget``: seed 0 at the picked rate with ``budget.trainable_params=BUDGET`` (the trainable count
   of LoRA r=8 on query/value plus the head) for every method whose default size differs from it;
   methods without a size knob say so. Records go to ``<out>/budget``. The optimizers that train
   every weight and whose state the budget can size (``lorabench.budget.STATE_FORMULAS``) run at
   ``budget.optimizer_state_mb=OPT_BUDGET_MB`` instead, into ``<out>/budget_optimizer``.
4. ``ranks``: DyLoRA (r_max = 8) evaluated at every rank after training, and LoRA trained separately
   at r = 1, 2, 4, 8 (``RANKS``), at their picked rates, into ``<out>/ranks``.
5. ``report``: ``<out>/sweep.md`` from the sweep records, ``<out>/README.md`` (the per-method table,
   the budget table, what cannot run here) and the same table between the leaderboard markers of the
   project README.

Selecting on the dev set that is also reported follows the GLUE practice of the LoRA-family papers;
seeds 1 and 2 are fresh runs. Runs execute in ``--jobs`` worker processes (one fresh process per
run, so peak memory is per run), each with cpu_count / jobs threads.

Data: ``--data-dir`` (official GLUE TSV / E2E csv folder), else ``../shared/data/glue/SST-2`` (Track
B: ``../shared/data/e2e``) when present, else the hub; the records say which. ``--hardware`` picks the
hardware preset (default cpu; run ids include it, so CPU and GPU records never mix). Failures are
listed at the end and do not stop the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lorabench.tuning.ladder import LR_LADDER, MAX_EDGE_STEPS, describe_pick, extend_grid, pick_lr, start_grid
from lorabench.tuning.runs import read_if_completed, run_ids_by_rate, run_tasks
from lorabench.tuning.search import run_rounds

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = [
    "model=minilm_l6",
    "dataset=sst2",
    "dataset.train_size=4000",
    "dataset.max_length=128",
    "train=default",
    "train.max_steps=250",
    "train.global_batch_size=16",
    "train.eval_every=0",
    "train.warmup_ratio=0.06",
    "hardware=cpu",
    "hardware.micro_batch_size=16",
    "progress=false",
    "checkpoint.save_model=false",  # the numbers only: no model/ folder per full-weight run (not in run ids)
]
GALORE_FINETUNING = ["method.scale=4", "method.update_proj_gap=500"]
# BAdam's preset switches block every 50 steps (the authors' K for runs of thousands of steps); its blocks
# are minilm_l6's 6 layers (the pooler and head train at every step, the embeddings stay frozen) and the
# first visit lasts K - 1 steps, so K = 50 would give the last layer 1 of the 250 steps. K = 42 makes one
# ascending pass: 41, 42, 42, 42, 42 and 41 steps.
METHOD_OVERRIDES = {
    **{name: GALORE_FINETUNING for name in ("galore", "galore_torch", "q_galore")},
    # dct_adamw has no scale and its preset is the authors' DCTAdamW defaults (columns re-chosen every step)
    "badam": ["method.switch_every=42"],
}
# Learning-rate starting point per method; methods not listed use DEFAULT_LR (LoRA-family adapters).
DEFAULT_LR = 5e-4
FAMILY_LR = {
    "full": 5e-5,
    "lisa": 5e-5,
    "badam": 5e-5,  # full-weight AdamW
    "galore": 3e-5,  # GaLore README (GLUE)
    "galore_torch": 3e-5,
    "q_galore": 3e-5,
    "dct_adamw": 3e-5,
    "fira": 1e-4,
    "frugal": 1e-4,
    "vera": 5e-3,  # few trainable parameters: their papers use larger learning rates
    "nola": 5e-3,
    "lora_xs": 5e-3,
    "lora_sb": 5e-3,
    "inttune": 5e-3,
    "svfit": 5e-3,
    "loldu": 5e-3,
    "flora": 5e-3,
    "salt": 1e-3,
}
# Extra sweep points for methods whose seed-0 run at the family default stayed at or near chance
# (training loss still above 0.6 after the epoch): larger rates first; NOLA and NLoRA, which stayed at
# chance at every larger rate (a too-large update, their loss never fell), also get smaller ones.
EXTRA_LR = {
    "galore": [1e-4],
    "galore_torch": [1e-4],
    "q_galore": [1e-4],
    # no scale since it follows the authors' DCTAdamW: at 3e-5 and 1e-4 it stayed at chance (loss 0.69 -> 0.66),
    # and equal chance scores pick the smaller rate, so the larger ones are grid points from the start
    "dct_adamw": [1e-4, 5e-4, 2e-3],
    "adalora": [2e-3, 5e-3],
    "ffa_lora": [2e-3, 5e-3],
    "lorafa": [2e-3, 5e-3],
    "lamda": [2e-3, 5e-3],
    "lamda_plus": [2e-3, 5e-3],
    "increlora": [2e-3, 5e-3],
    "nlora": [1e-4, 2e-4, 2e-3, 5e-3],
    "nola": [1e-4, 5e-4, 2e-2, 5e-2],
    "svfit": [2e-2],
    "inttune": [2e-2],
    "loldu": [2e-2],
    "fira": [3e-5],  # seed 1 at 1e-4 stayed at chance
    "badam": [2e-4],  # 57.7 at 5e-5: each of its 7 blocks trains only about 36 of the 250 steps
    # PEGO (scale 1, as its authors' alpha = rank) stayed at chance at 1e-4..1e-3 (loss 0.69 -> 0.65 at
    # 1e-3); equal chance scores pick the smallest rate, so the edge extension went down, not up
    # after that top-up PEGO and S2-LoRA still picked 2e-2, the top of the grid after its two extensions,
    # so 1e-2 and 2e-2 become grid points and the extension goes on above 2e-2
    "pego": [2e-3, 5e-3, 1e-2, 2e-2],
    "s2_lora": [2e-3, 5e-3, 1e-2, 2e-2],
    # still rising at the largest rate after the two edge extensions (5e-4 -> 5e-3): the rates already
    # run become grid points, so the extension goes on above 5e-3
    **dict.fromkeys(("alignguard_lora", "codyra", "sara", "tlora", "wara"), [2e-3, 5e-3]),
}
# Grid extension (lorabench.tuning.ladder, which holds LR_LADDER and MAX_EDGE_STEPS): while a method's
# pick sits at an edge of a grid of two or more points, the sweep adds the next rate of LR_LADDER beyond
# that edge, at most MAX_EDGE_STEPS (2) times per method.
RANKS = (1, 2, 4, 8)  # LoRA trained at each rank, beside DyLoRA's rank curve (r_max = 8)
BUDGET = 74_498  # LoRA r=8 on query/value of minilm_l6 (73,728) + the classifier head (770)
# Common optimizer-state budget (MiB) for the GaLore-family optimizers that train every weight: the
# smallest round size every one of them can meet (galore-torch keeps each whole SVD factor, so its
# floor on minilm_l6 is 112.2 MiB at rank 1; the unprojected embeddings alone hold about 90 MiB).
OPT_BUDGET_MB = 120
# Track B's, by the same rule: galore-torch's floor on smollm2_135m is 416.1 MiB (rank 1: its fp32 SVD
# factors hold 198 MiB, the unprojected tied embeddings 216 MiB); 450 MiB gives galore and fira rank
# ~120, frugal density ~0.23, galore-torch rank ~20.
OPT_BUDGET_MB_B = 450
# Presets that cannot run in this track, with the reason (listed in the README instead of a number).
NOT_IN_TRACK = {
    "qlora": "4-bit base weights need bitsandbytes' CUDA kernels",
    "loftq": "4-bit base weights need bitsandbytes' CUDA kernels",
    "xlora": "peft's X-LoRA supports causal language models only, and it mixes experts trained on other "
    "tasks (recipe: `scripts/xlora.py`)",
}
PROTOCOL_B = [
    "model=smollm2_135m",
    "dataset=e2e",
    "dataset.train_size=160",
    "dataset.eval_size=48",
    "dataset.max_length=128",
    "dataset.num_beams=1",
    "dataset.max_new_tokens=64",
    "train=default",
    "train.max_steps=40",
    "train.global_batch_size=4",
    "train.eval_every=0",
    "train.warmup_ratio=0.06",
    "hardware=cpu",
    "hardware.micro_batch_size=4",
    "hardware.mixed_precision=bf16",
    "progress=false",
    "checkpoint.save_model=false",
]
# Track B starts each method's sweep from the rate Track A picked for it in Track A's first sweep (before
# its single-point grids got the neighbour check), which carries what Track A learned about the method's
# scale of learning rate, and adds the rate two LR_LADDER steps above it (x3 to x5): Track B's schedule is
# six times shorter. Fixed, so that Track B's run ids do not move when Track A's picks do; Track B's own
# edge extension then finds its pick (a test checks every start rate is one Track A ran for the method).
TRACK_B_START = {
    **dict.fromkeys(("allora", "bone", "corda", "dct_adamw", "dora", "dylora", "eva", "fira", "hydra_lora"), 5e-4),
    **dict.fromkeys(("lora", "lora_ga", "lora_pro", "loraplus", "milora", "miss", "nola", "olora", "pissa"), 5e-4),
    **dict.fromkeys(("randlora", "rslora", "slora", "soma", "soma_recipe", "sora"), 5e-4),
    **dict.fromkeys(("full", "lisa"), 5e-5),
    "frugal": 1e-4,
    # NLoRA's old init (pinv, subtracted product) needed tiny rates; after the authors' init its Track B sweep
    # from 1e-4 still rose at 2e-3 after both extensions, so it restarts from 2e-3 (a rate Track A ran)
    "nlora": 2e-3,
    **dict.fromkeys(("badam", "galore", "galore_torch", "q_galore"), 2e-4),
    "salt": 1e-3,
    **dict.fromkeys(("flora", "lora_sb", "lora_xs", "vera"), 5e-3),
    **dict.fromkeys(("adalora", "lamda", "lamda_plus"), 1e-2),
    **dict.fromkeys(("ffa_lora", "increlora", "inttune", "loldu", "lorafa"), 2e-2),
    "svfit": 1e-1,
    # the fourteen methods added after Track B's first run start from their (final) Track A picks
    "ba_lora": 5e-4,
    **dict.fromkeys(("block_lora", "diffora", "flexora", "lora_gnp", "mgpo", "sltrain"), 2e-3),
    **dict.fromkeys(("codyra", "sara", "tlora", "wara"), 5e-3),
    "alignguard_lora": 1e-2,
    "s2_lora": 2e-2,
    "pego": 5e-2,
}
# BAdam's blocks on smollm2_135m are its 30 decoder layers (a causal LM keeps its embeddings, final norm
# and LM head frozen, as the authors' default): K = 1 visits each once in Track B's first 30 steps.
METHOD_OVERRIDES_B = {**METHOD_OVERRIDES, "badam": ["method.switch_every=1"]}
NOT_IN_TRACK_B = {
    "qlora": "4-bit base weights need bitsandbytes' CUDA kernels",
    "loftq": "4-bit base weights need bitsandbytes' CUDA kernels",
    "xlora": "X-LoRA mixes LoRA experts trained on other tasks (`method.experts`), so it has no single-task "
    "run to rank; its recipe is `scripts/xlora.py`",
}


def track_a_grid(method: str) -> list[float]:
    """Track A's starting grid: the family default plus the method's ``EXTRA_LR`` points; a method with
    no extra points also gets the next ``LR_LADDER`` rate above its default (the neighbour check), so
    that every grid has two points and edge extension can move the pick either way."""
    return start_grid(FAMILY_LR.get(method, DEFAULT_LR), EXTRA_LR.get(method, ()), LR_LADDER, steps_up=1)


def track_b_grid(method: str) -> list[float]:
    """Track B's starting grid: the method's ``TRACK_B_START`` rate and the rate two ``LR_LADDER`` steps above."""
    return start_grid(TRACK_B_START.get(method, DEFAULT_LR), (), LR_LADDER, steps_up=2)


@dataclasses.dataclass(frozen=True)
class Track:
    """One benchmark of the leaderboard: its fixed protocol and how its score is reported."""

    key: str
    title: str  # markdown, e.g. "Track A: `minilm_l6` on GLUE SST-2"
    protocol: tuple[str, ...]
    metric: str  # key of the record's final metrics; reported x 100
    metric_label: str  # column header
    shared_data: str  # default data folder under ../shared/data
    out: str  # default output folder, relative to the project root
    budget_params: int  # trainable count of LoRA r=8 on the model's default targets (+ head)
    not_in_track: dict[str, str]
    rank_curve: bool  # run the ``ranks`` stage
    optimizer_budget_mb: float | None  # run the optimizer-state budget at this size
    marker: str  # README block: <!-- {marker}:start --> ... <!-- {marker}:end -->
    start_grid: Callable[[str], list[float]]  # method -> the learning rates its sweep starts from
    method_overrides: dict[str, list[str]]  # per-method settings the protocol fixes


TRACK_A = Track(
    key="a",
    title="Track A: `minilm_l6` on GLUE SST-2",
    protocol=tuple(PROTOCOL),
    metric="accuracy",
    metric_label="SST-2 dev acc",
    shared_data="glue/SST-2",
    out="results/leaderboard",
    budget_params=BUDGET,
    not_in_track=NOT_IN_TRACK,
    rank_curve=True,
    optimizer_budget_mb=OPT_BUDGET_MB,
    marker="leaderboard",
    start_grid=track_a_grid,
    method_overrides=METHOD_OVERRIDES,
)
TRACK_B = Track(
    key="b",
    title="Track B: `smollm2_135m` on E2E NLG",
    protocol=tuple(PROTOCOL_B),
    metric="bleu",
    metric_label="E2E BLEU",
    shared_data="e2e",
    out="results/leaderboard/track_b",
    budget_params=460_800,  # LoRA r=8 on q_proj (576x576) and v_proj (576x192) of 30 layers; no head
    not_in_track=NOT_IN_TRACK_B,
    rank_curve=False,
    optimizer_budget_mb=OPT_BUDGET_MB_B,
    marker="leaderboard-b",
    start_grid=track_b_grid,
    method_overrides=METHOD_OVERRIDES_B,
)
TRACKS = {track.key: track for track in (TRACK_A, TRACK_B)}


def lr_grid(method: str, track: Track | None = None) -> list[float]:
    """The method's starting grid in ``track`` (default Track A)."""
    return (track or TRACK_A).start_grid(method)


def sweep_grid(method: str, points: dict[float, float], track: Track | None = None) -> list[float]:
    """The starting grid grown by edge extension given the results so far (``points``: lr -> dev
    accuracy at seed 0): while every grid point has a result and the pick is the smallest or largest
    of two or more points, add the next ``LR_LADDER`` rate beyond it (``MAX_EDGE_STEPS`` at most)."""
    return extend_grid(lr_grid(method, track), points, LR_LADDER, MAX_EDGE_STEPS)


def overrides(
    method: str,
    lr: float,
    seed: int,
    results_dir: Path,
    data_dir: str | None,
    track: Track = TRACK_A,
    hardware: str = "cpu",
) -> list[str]:
    data = [f"dataset.data_dir={data_dir}"] if data_dir else []
    protocol = [f"hardware={hardware}" if item == "hardware=cpu" else item for item in track.protocol]
    return [
        f"method={method}",
        *protocol,
        *track.method_overrides.get(method, []),
        *data,
        f"train.lr={lr}",
        f"seed={seed}",
        f"results_dir={results_dir}",
    ]


def run_all(tasks: list[list[str]], jobs: int) -> list[str]:
    """Run the tasks whose completed record does not exist yet (checked first, so that a resumed stage
    spawns no worker just to skip a run) in ``jobs`` worker processes, one fresh process per run
    (``lorabench.tuning.runs.run_tasks``); returns the failures."""
    return run_tasks(tasks, max(1, jobs), command="python scripts/leaderboard.py", log="[leaderboard]", quote=False)


def sweep_results(
    sweep_dir: Path, methods: list[str], data_dir: str | None, track: Track = TRACK_A, hardware: str = "cpu"
) -> dict[str, dict[float, float]]:
    """method -> {lr: the track's metric} from the completed sweep records of each method's grid, as grown
    by ``sweep_grid`` (records of other settings in the folder are ignored: only run ids count)."""
    from lorabench.results.record import iter_records

    wanted = set()
    for m in methods:
        rates = sorted({*lr_grid(m, track), *LR_LADDER})
        task_for = lambda lr, m=m: overrides(m, lr, 0, sweep_dir, data_dir, track, hardware)  # noqa: E731
        wanted.update(run_ids_by_rate(task_for, rates).values())
    found: dict[str, dict[float, float]] = {}
    for _, record, _ in iter_records(sweep_dir):
        if record is None or record["status"] != "completed" or record["run_id"] not in wanted:
            continue
        final = (record.get("metrics") or {}).get("final") or {}
        if track.metric in final:
            found.setdefault(record["config"]["method"]["label"], {})[record["config"]["train"]["lr"]] = final[
                track.metric
            ]
    grids = {method: sweep_grid(method, points, track) for method, points in found.items()}
    return {method: {lr: acc for lr, acc in points.items() if lr in grids[method]} for method, points in found.items()}


def write_sweep_table(
    path: Path, methods: list[str], found: dict[str, dict[float, float]], track: Track = TRACK_A
) -> None:
    lines = [
        f"# {track.title}: learning-rate sweep (seed 0, {track.metric_label} x 100)",
        "",
        f"Generated by `scripts/leaderboard.py`; the pick is the highest {track.metric_label} (ties: smaller rate).",
        "",
        f"| method | learning rate: {track.metric_label} | picked |",
        "|---|---|---|",
    ]
    for method in methods:
        points = found.get(method, {})
        grid = sweep_grid(method, points, track)
        cells = ", ".join(f"{lr:g}: {100 * points[lr]:.2f}" if lr in points else f"{lr:g}: -" for lr in grid)
        pick = describe_pick(lr_grid(method, track), grid, points)
        lines.append(f"| {method} | {cells} | {pick} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="presets to run (default: every preset this track can run)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--stage", choices=("sweep", "main", "budget", "ranks", "report", "all"), default="all")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--track", choices=sorted(TRACKS), default="a")
    parser.add_argument("--hardware", default="cpu", help="hardware preset (conf/hardware; default cpu)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="output folder (default: the track's, under results/)")
    args = parser.parse_args()
    track = TRACKS[args.track]
    hardware_presets = sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml"))
    if args.hardware not in hardware_presets:
        parser.error(f"unknown --hardware {args.hardware!r}; valid: {hardware_presets}")

    from lorabench.config_store import compose
    from lorabench.errors import ConfigError
    from lorabench.launch import CONF_DIR
    from lorabench.methods.catalog import load_presets
    from lorabench.validate import build_run

    presets = load_presets(CONF_DIR / "method")
    track_methods = sorted(m for m in presets if m not in track.not_in_track)
    methods = args.methods or track_methods
    unknown = sorted(set(methods) - set(presets))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {sorted(presets)}")
    shared = ROOT.parent / "shared" / "data" / track.shared_data
    data_dir = args.data_dir or (str(shared) if shared.is_dir() else None)
    out = Path(args.out or ROOT / track.out)

    def task(method: str, lr: float, seed: int, folder: Path) -> list[str]:
        return overrides(method, lr, seed, folder, data_dir, track, args.hardware)

    def results(names: list[str]) -> dict[str, dict[float, float]]:
        return sweep_results(sweep_dir, names, data_dir, track, args.hardware)

    def expected(found: dict, folder: Path, extra: list[str] = ()):
        """(method, seed) -> the run id this protocol asks for in ``folder`` (None: no pick yet)."""
        from lorabench.results.record import run_id

        def wanted(method: str, seed: int) -> str | None:
            if method not in found:
                return None
            return run_id(compose([*task(method, pick_lr(found[method]), seed, folder), *extra]))

        return wanted

    budget_size = [f"budget.trainable_params={track.budget_params}"]
    optimizer_size = [f"budget.optimizer_state_mb={track.optimizer_budget_mb}"]
    sweep_dir, records_dir = out / "sweep", out / "records"
    failures, start = [], time.perf_counter()
    try:  # the protocol on this machine (e.g. --hardware gpu without CUDA) fails here, not in every run
        build_run(compose(task(methods[0], DEFAULT_LR, 0, records_dir)))
    except ConfigError as exc:
        parser.error(f"track {track.key} with --hardware {args.hardware}: {exc}")

    if args.stage in ("sweep", "all"):
        failures += run_rounds(  # rounds: run the grids, then the edge extensions those results call for
            lambda found: {m: sweep_grid(m, found.get(m, {}), track) for m in methods},
            lambda: results(methods),
            lambda todo: run_all([task(m, lr, 0, sweep_dir) for m, lr in todo], args.jobs),
        )
        write_sweep_table(out / "sweep.md", track_methods, results(track_methods), track)  # every method, always
    if args.stage in ("main", "all"):
        found = results(methods)
        failures += [
            f"{m}: no completed sweep run, so no learning rate (run --stage sweep)" for m in methods if m not in found
        ]
        retire_superseded(records_dir, expected(found, records_dir), out / "superseded")
        tasks = []
        for seed in args.seeds:  # seed by seed, so that an interrupted stage leaves every method with n seeds
            for method in (m for m in methods if m in found):
                tasks.append(task(method, pick_lr(found[method]), seed, records_dir))
                if seed == 0:
                    _copy_existing_run(tasks[-1], sweep_dir, records_dir)
        failures += run_all(tasks, args.jobs)
    if args.stage in ("budget", "all"):
        found = results(methods)
        picks = {m: pick_lr(points) for m, points in found.items()}
        retire_superseded(out / "budget", expected(found, out / "budget", budget_size), out / "superseded")
        tasks = []
        for method in (m for m in methods if m in found):
            record = read_if_completed(sweep_dir, task(method, picks[method], 0, sweep_dir))
            all_weights_train = record is not None and record["method"]["adapter"] == "none"  # no count budget
            if record is None or all_weights_train or record["cost"]["trainable_params"] == track.budget_params:
                continue
            tasks.append([*task(method, picks[method], 0, out / "budget"), *budget_size])
        failures += [f for f in run_all(tasks, args.jobs) if "declares no size knob" not in f]
        if track.optimizer_budget_mb is not None:
            retire_superseded(
                out / "budget_optimizer", expected(found, out / "budget_optimizer", optimizer_size), out / "superseded"
            )
            tasks = [
                [*task(m, picks[m], 0, out / "budget_optimizer"), *optimizer_size]
                for m in optimizer_budget_methods(methods, presets)
                if m in found
            ]
            failures += run_all(tasks, args.jobs)
    if args.stage in ("ranks", "all") and track.rank_curve:
        found = results(["dylora", "lora"])
        retire_other_rates(out / "ranks", {m: pick_lr(p) for m, p in found.items()}, out / "superseded")
        tasks = []
        for seed in args.seeds:
            if "dylora" in found:
                dylora = task("dylora", pick_lr(found["dylora"]), seed, out / "ranks")
                tasks.append([*dylora, "method.eval_all_ranks=true"])
            for rank in RANKS if "lora" in found else ():
                tasks.append([*task("lora", pick_lr(found["lora"]), seed, out / "ranks"), f"method.rank={rank}"])
                _copy_existing_run(tasks[-1], sweep_dir, out / "ranks")  # r = 8 is the main run (seed 0: the sweep run)
                _copy_existing_run(tasks[-1], records_dir, out / "ranks")
        failures += run_all(tasks, args.jobs)
    if args.stage in ("report", "all"):
        write_sweep_table(
            out / "sweep.md", track_methods, results(track_methods), track
        )  # also after an interrupted sweep
        write_report(out, track_methods, track, {m: pick_lr(p) for m, p in results(track_methods).items()})
    print(f"[leaderboard] done in {time.perf_counter() - start:.0f}s; failures: {failures or 'none'}")
    return 1 if failures else 0


def optimizer_budget_methods(methods: list[str], presets: dict[str, dict]) -> list[str]:
    """The methods that train every weight with an optimizer whose state the budget can size."""
    from lorabench.budget import STATE_FORMULAS

    return [
        m
        for m in methods
        if presets[m].get("optimizer") in STATE_FORMULAS
        and presets[m].get("adapter", "none") == "none"
        and presets[m].get("procedure", "none") == "none"
    ]


def retire_superseded(folder: Path, expected_id, superseded: Path) -> list[str]:
    """Move the run folders under ``folder`` that the current protocol no longer asks for to
    ``superseded/<folder name>/``: ``expected_id(method, seed)`` gives the run id it asks for (None:
    the method is not managed here, its runs stay). A run of a managed method with another id ran at
    a learning rate the grown sweep replaced, or with a setting the protocol changed; moving it keeps
    such runs out of the tables without deleting any record. Returns the moved run ids."""

    def replaced(record: dict) -> bool:
        wanted = expected_id(record["config"]["method"]["label"], record["config"]["seed"])
        return wanted is not None and record["run_id"] != wanted

    return _move_runs(folder, replaced, superseded)


def retire_other_rates(folder: Path, picks: dict[str, float], superseded: Path) -> list[str]:
    """Like ``retire_superseded`` for folders with several runs per method and seed (the rank
    comparison): a run of a method in ``picks`` at another learning rate is moved."""

    def replaced(record: dict) -> bool:
        label = record["config"]["method"]["label"]
        return label in picks and record["config"]["train"]["lr"] != picks[label]

    return _move_runs(folder, replaced, superseded)


def _move_runs(folder: Path, replaced, superseded: Path) -> list[str]:
    from lorabench.results.record import iter_records

    moved = []
    for path, record, _ in list(iter_records(folder)):
        if record is not None and replaced(record):
            target = superseded / folder.name / path.parent.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path.parent), str(target))
            moved.append(record["run_id"])
    if moved:
        print(f"[leaderboard] moved {len(moved)} superseded run(s) to {superseded / folder.name}")
    return moved


def completed(folder: Path) -> list[dict]:
    from lorabench.results.record import iter_records

    return [record for _, record, _ in iter_records(folder) if record and record["status"] == "completed"]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _paper_link(paper: str | None) -> str:
    if paper and paper.startswith("arXiv:"):
        return f"[{paper}](https://arxiv.org/abs/{paper.removeprefix('arXiv:')})"
    return paper or "-"


def leaderboard_rows(records: list[dict], metric: str = "accuracy") -> list[dict]:
    """One row per method and learning rate: the metric (x 100) over seeds and the mean costs, best first."""
    by_method: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        by_method.setdefault((record["config"]["method"]["label"], record["config"]["train"]["lr"]), []).append(record)
    rows = []
    for (method, _), group in by_method.items():
        accs = [100 * r["metrics"]["final"][metric] for r in group]
        peaks = [(r["cost"].get("peak_memory") or {}).get("cpu_peak_rss_bytes") for r in group]
        rows.append(
            {
                "method": method,
                "paper": group[0]["method"].get("paper"),
                "family": group[0]["method"].get("family"),
                "lr": group[0]["config"]["train"]["lr"],
                "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "n": len(accs),
                "params": _mean([r["cost"].get("trainable_params") for r in group]),
                "opt_mb": _mean([(r["cost"].get("optimizer_state_bytes") or 0) / 2**20 for r in group]),
                "peak_mb": _mean([p / 2**20 if p else None for p in peaks]),
                "tokens_s": _mean([r["cost"].get("tokens_per_s") for r in group]),
                "intruders": _mean([(r.get("analysis") or {}).get("intruders_total") for r in group]),
                "wall_s": sum(r["cost"].get("wall_time_s") or 0 for r in group),
            }
        )
    return sorted(rows, key=lambda row: -row["mean"])


def leaderboard_table(rows: list[dict], track: Track = TRACK_A, picks: dict[str, float] | None = None) -> str:
    """The per-method table; with ``picks`` (method -> the sweep's current pick), a row whose runs used
    another rate says so: the sweep moved on and ``--stage main`` has not rerun its seeds yet."""
    picks = picks or {}
    lines = [
        f"| # | method | {track.metric_label} (mean ± std, n) | lr | trainable params | opt-state MB | peak RSS MB "
        "| tokens/s | intruders | paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        lr = f"{row['lr']:g}"
        if picks.get(row["method"], row["lr"]) != row["lr"]:
            lr += f" (sweep now picks {picks[row['method']]:g}; seeds not rerun yet)"
        lines.append(
            f"| {i} | {row['method']} | {row['mean']:.2f} ± {row['std']:.2f} ({row['n']}) | {lr} "
            f"| {_fmt(row['params'], ',.0f')} | {_fmt(row['opt_mb'], ',.2f')} | {_fmt(row['peak_mb'], ',.0f')} "
            f"| {_fmt(row['tokens_s'], ',.0f')} | {_fmt(row['intruders'], '.1f')} | {_paper_link(row['paper'])} |"
        )
    return "\n".join(lines)


def budget_table(records: list[dict], main: list[dict], main_rows: dict[str, dict], track: Track = TRACK_A) -> str:
    """Budget runs (seed 0) plus the main seed-0 runs whose preset size already equals the budget."""
    at_budget = [
        r for r in main if r["config"]["seed"] == 0 and r["cost"].get("trainable_params") == track.budget_params
    ]
    lines = [
        f"| method | size knob | trainable params | {track.metric_label} (seed 0) | preset size: params, score (n) |",
        "|---|---|---|---|---|",
    ]
    for record in sorted(records + at_budget, key=lambda r: -r["metrics"]["final"][track.metric]):
        method = record["config"]["method"]["label"]
        solved = record["method_report"].get("budget")
        knob = f"{solved['knob']}={solved['value']}" if solved else "preset (already at the budget)"
        if solved and solved.get("capped"):
            knob += " (its largest: the budget is out of reach)"
        row = main_rows.get(method)
        default = f"{row['params']:,.0f}, {row['mean']:.2f} ({row['n']})" if row else "-"
        lines.append(
            f"| {method} | {knob} | {record['cost']['trainable_params']:,} "
            f"| {100 * record['metrics']['final'][track.metric]:.2f} | {default} |"
        )
    return "\n".join(lines)


def optimizer_budget_table(records: list[dict], main_rows: dict[str, dict], track: Track = TRACK_A) -> str:
    """Optimizer-state budget runs (seed 0) beside each method's preset size and score."""
    lines = [
        f"| method | size knob | optimizer state (MiB) | {track.metric_label} (seed 0) "
        "| preset: state MiB, score (n) |",
        "|---|---|---|---|---|",
    ]
    for record in sorted(records, key=lambda r: -r["metrics"]["final"][track.metric]):
        method = record["config"]["method"]["label"]
        solved = record["method_report"].get("budget") or {}
        row = main_rows.get(method)
        default = f"{row['opt_mb']:.1f}, {row['mean']:.2f} ({row['n']})" if row else "-"
        lines.append(
            f"| {method} | {solved.get('knob', '?')}={solved.get('value', '?')} "
            f"| {record['cost']['optimizer_state_bytes'] / 2**20:.1f} "
            f"| {100 * record['metrics']['final'][track.metric]:.2f} | {default} |"
        )
    return "\n".join(lines)


# Methods whose rule or preset changed to match the authors' released code (lorabench methods
# --fidelity); the report compares their rows with the superseded ones, run by the old rule.
FIDELITY_RERUNS = (
    *("badam", "dct_adamw", "fira", "frugal", "lisa", "lora_pro", "q_galore"),  # optimizers and procedures
    *("dylora", "hydra_lora", "increlora", "inttune", "lamda", "lamda_plus", "loldu", "lora_ga", "lora_sb"),
    *("milora", "nlora", "nola", "salt", "slora", "soma", "soma_recipe", "sora", "svfit"),  # adapters, inits
)


def fidelity_table(superseded: list[dict], main_rows: dict[str, dict], track: Track = TRACK_A) -> str:
    """Before -> after for ``FIDELITY_RERUNS``: before is the superseded row of the method with the
    most seeds (the last one the leaderboard reported; ties: the most recent), after the current row."""
    before: dict[str, dict] = {}
    latest = {r["run_id"]: r.get("finished_at") or "" for r in superseded}
    for row in leaderboard_rows(superseded, track.metric):
        ids = [
            r["run_id"]
            for r in superseded
            if r["config"]["method"]["label"] == row["method"] and r["config"]["train"]["lr"] == row["lr"]
        ]
        row["finished"] = max(latest[i] for i in ids)
        best = before.get(row["method"])
        if best is None or (row["n"], row["finished"]) > (best["n"], best["finished"]):
            before[row["method"]] = row
    lines = [
        f"| method | before: {track.metric_label} (n) at lr | after: {track.metric_label} (n) at lr | change |",
        "|---|---|---|---|",
    ]
    for method in FIDELITY_RERUNS:
        old, new = before.get(method), main_rows.get(method)
        cells = [f"{r['mean']:.2f} ± {r['std']:.2f} ({r['n']}) at {r['lr']:g}" if r else "-" for r in (old, new)]
        change = f"{new['mean'] - old['mean']:+.2f}" if old and new else "-"
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {change} |")
    return "\n".join(lines)


def old_code_records(out: Path, main: list[dict]) -> list[dict]:
    """The records of the old rules: superseded ones and those in ``records/`` not yet retired."""
    return completed(out / "superseded" / "records") + [r for r in main if "fidelity" not in r.get("method", {})]


def current_code_rows(records: list[dict], track: Track = TRACK_A) -> dict[str, dict]:
    """method -> its row over the records written by code that declares fidelity entries (records
    of the old rules, not yet retired because their seeds have not been rerun, are left out)."""
    fresh = [r for r in records if "fidelity" in r.get("method", {})]
    return {row["method"]: row for row in leaderboard_rows(fresh, track.metric)}


def write_report(out: Path, methods: list[str], track: Track = TRACK_A, picks: dict[str, float] | None = None) -> None:
    """``<out>/README.md`` and the table between the track's markers in the project README; ``picks``
    (method -> the sweep's current pick) flags rows whose runs used a rate the sweep has replaced."""
    from lorabench.results.record import iter_records

    main = completed(out / "records")
    rows = leaderboard_rows(main, track.metric)
    by_method = {row["method"]: row for row in rows}
    budget = completed(out / "budget")
    budget_opt = completed(out / "budget_optimizer")
    sweep = completed(out / "sweep")
    ranks = completed(out / "ranks")
    unique = {r["run_id"]: r for r in sweep + main + budget + budget_opt + ranks}  # copied runs count once
    seconds = sum(r["cost"].get("wall_time_s") or 0 for r in unique.values())
    missing = [m for m in methods if m not in by_method]
    unmatched = [
        f"- `{r['config']['method']['label']}`: {(r.get('error') or {}).get('message', r.get('error'))}"
        for _, r, _ in iter_records(out / "budget")
        if r and r["status"] == "failed"
    ]
    excluded = [f"- `{name}`: {why}" for name, why in track.not_in_track.items()]
    excluded += [f"- `{name}`: no completed record yet" for name in missing]
    table = leaderboard_table(rows, track, picks)
    summary = (
        f"{track.title}, {len(rows)} methods, {len(main)} runs "
        f"(seeds {sorted({r['config']['seed'] for r in main})}); "
        f"{len(sweep)} sweep runs, {len(budget) + len(budget_opt)} budget runs, {len(ranks)} rank-comparison runs; "
        f"{len(unique)} distinct runs took {seconds / 3600:.1f} h of run wall time in all."
    )
    optimizer_section = []
    if track.optimizer_budget_mb is not None:
        optimizer_section = [
            f"## {track.title} at a common optimizer-state budget: {track.optimizer_budget_mb} MiB (seed 0)",
            "",
            "The optimizers that train every weight, sized by `budget.optimizer_state_mb` (rank, or FRUGAL's "
            "density); q_galore (quantized bases) and dct_adamw (shared DCT matrices) have no state formula.",
            "",
            optimizer_budget_table(budget_opt, by_method, track),
            "",
        ]
    body = [
        f"# lorabench leaderboard: {track.title}",
        "",
        "Generated by `scripts/leaderboard.py`; protocol in that script's docstring.",
        "",
        summary,
        "",
        "## Every method at its paper-default size",
        "",
        table,
        "",
        f"## At a common budget: {track.budget_params:,} trainable parameters (seed 0)",
        "",
        budget_table(budget, main, by_method, track),
        "",
        "Budget runs keep the learning rate picked at the preset size (seed 0, no sweep of their own).",
        "",
        "Methods whose size the budget cannot set:" if unmatched else "",
        "",
        *unmatched,
        "",
        *optimizer_section,
        "## Re-run to match the authors' code: before -> after",
        "",
        "Methods whose update rule or preset changed when parity tests pinned them to their authors' released "
        "code (the README's Fidelity section); before: the superseded rows of the old rule (`superseded/records`).",
        "",
        fidelity_table(old_code_records(out, main), current_code_rows(main, track), track),
        "",
        "## Not in this track",
        "",
        *excluded,
        "",
        "Learning-rate sweep: [sweep.md](sweep.md). Pareto plots: [plots/](plots/). Records: `records/`, "
        "`sweep/`, `budget/`, `budget_optimizer/`, `ranks/`; runs at a learning rate the grown sweep "
        "replaced: `superseded/`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(body), encoding="utf-8")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- {track.marker}:start -->", f"<!-- {track.marker}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        block = "\n".join([start, "", summary, "", table, "", "Not in this track:", "", *excluded, "", end])
        readme.write_text(head + block + tail, encoding="utf-8")


def _copy_existing_run(task: list[str], sweep_dir: Path, records_dir: Path) -> None:
    """A task already run elsewhere (identical run id: the seed-0 main run is the sweep run at the
    picked rate, LoRA r = 8 in the rank comparison is the main run): copy its record."""
    from lorabench.config_store import compose
    from lorabench.results.record import RECORD_NAME, run_id

    rid = run_id(compose(task))
    source, target = sweep_dir / rid / RECORD_NAME, records_dir / rid / RECORD_NAME
    if source.is_file() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


if __name__ == "__main__":
    sys.exit(main())
