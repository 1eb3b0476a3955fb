"""The method x strategy matrix, measured: every method preset trained for a few steps on 2 CPU
processes (gloo) under ``hardware.strategy=ddp``, ``=fsdp`` (FSDP2), ``=zero2`` and ``=zero3``
(DeepSpeed ZeRO), on a tiny random BERT and a generated SST-2, with dropout off. FSDP2 and ZeRO
partition optimizer state and gradients (FSDP2 and ZeRO-3 the weights too) but compute the same
update, so their losses and trained outputs must equal DDP's.

    python scripts/strategy_matrix.py [--presets lora full ...] [--out results/strategies]

Writes ``matrix.json`` (per preset and strategy: status, losses, optimizer-state bytes per process,
the largest difference of each partitioned run's saved tensors from the DDP run's, the verdict) and
``matrix.md``; ``lorabench methods --strategies`` shows the verdicts beside what the components
declare. A preset whose components declare they need whole tensors is refused before training
(its verdict says so); one that fails or differs is a finding to fix or to declare. Resumable: a
preset already in ``matrix.json`` is skipped unless ``--again``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
COMPARED = STRATEGIES[1:]  # each against ddp
HARDWARE = {"ddp": "cpu_ddp2", "fsdp": "cpu_fsdp2", "zero2": "cpu_zero2", "zero3": "cpu_zero3"}
STEPS = 3
LOSS_RTOL = 1e-5  # a reduce-scatter sums in another order than DDP's all-reduce
TENSOR_ATOL = 1e-5
OUTPUT_FILES = ("adapter.safetensors", "model/model.safetensors")
# procedures whose events (a block switch, a layer re-sample) would otherwise fall after the last step, and
# presets sized beyond tiny_bert's 32-wide projections
PRESET_OVERRIDES = {
    "badam": ["method.switch_every=1"],
    "lisa": ["method.lisa_interval_steps=1"],
    "rslora": ["method.rank=8"],
}


def run_overrides(preset: str, strategy: str, data: Path, results: Path) -> list[str]:
    return [
        f"method={preset}",
        "model=tiny_bert",
        "dataset=sst2",
        f"dataset.data_dir={data}",
        "dataset.max_length=32",
        "train=quickstart",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=4",
        "train.log_every=1",
        "train.init_batches=2",
        "model.dropout=0.0",
        f"hardware={HARDWARE[strategy]}",
        "hardware.micro_batch_size=2",
        "analysis.intruders=false",
        f"results_dir={results / strategy}",
        "progress=false",
        *PRESET_OVERRIDES.get(preset, []),
    ]


def worker(preset: str, data: Path, results: Path) -> None:
    """Inside ``accelerate launch``: the preset under each strategy, one after the other."""
    from lorabench.config_store import compose
    from lorabench.launch import run_one

    refused = refusal_of(preset)
    for strategy in STRATEGIES:
        if strategy in refused:
            continue
        try:
            run_one(compose(run_overrides(preset, strategy, data, results)), f"strategy_matrix {preset}", False)
        except Exception as exc:  # its record says failed; the next strategy still runs
            print(f"[strategy_matrix] {preset} under {strategy}: {type(exc).__name__}: {exc}", file=sys.stderr)


def _record(folder: Path) -> dict | None:
    found = sorted(folder.glob("*/record.json"))
    return json.loads(found[0].read_text()) if found else None


def _tensor_difference(ddp_dir: Path, other_dir: Path) -> float | None:
    from safetensors.torch import load_file

    for name in OUTPUT_FILES:
        a, b = sorted(ddp_dir.glob(f"*/{name}")), sorted(other_dir.glob(f"*/{name}"))
        if a and b:
            x, y = load_file(str(a[0])), load_file(str(b[0]))
            if sorted(x) != sorted(y):
                return float("inf")
            return max(((x[k].float() - y[k].float()).abs().max().item() for k in x), default=0.0)
    return None


def _cell(record: dict | None, reason: str | None) -> dict:
    if record is None:
        return {"verdict": "refused", "reason": reason} if reason else {"verdict": "no record"}
    cell = {
        "status": record["status"],
        "losses": [e["loss"] for e in record["train_log"]],
        "optimizer_state_bytes": record["cost"].get("optimizer_state_bytes"),
    }
    if record["status"] != "completed":
        cell["verdict"] = "fails"
        cell["error"] = (record.get("error") or {}).get("message", "")[:300]
    return cell


def verdict(records: dict[str, dict | None], refusal: dict[str, str], differences: dict[str, float | None]) -> dict:
    """One preset's cell of each strategy: ``records`` and ``differences`` (largest saved-tensor
    difference from DDP) per strategy; ``refusal``: strategy -> why the declarations refuse it."""
    cells = {s: _cell(records.get(s), refusal.get(s)) for s in STRATEGIES}
    d = cells["ddp"]
    if d.get("status") == "completed":
        d["verdict"] = "runs"
    for strategy in COMPARED:
        c = cells[strategy]
        if c.get("status") != "completed":
            continue
        if d.get("status") == "completed":
            same_losses = len(c["losses"]) == len(d["losses"]) and all(
                abs(a - b) <= LOSS_RTOL * max(abs(b), 1e-12) for a, b in zip(c["losses"], d["losses"])
            )
            difference = differences.get(strategy)
            c["max_tensor_difference"] = difference
            c["verdict"] = "equals ddp" if same_losses and (difference or 0.0) <= TENSOR_ATOL else "differs from ddp"
        else:
            c["verdict"] = "runs (ddp refused: not compared)" if d.get("verdict") == "refused" else "runs (no ddp run)"
    return cells


def refusal_of(preset: str) -> dict[str, str]:
    from lorabench.method_params.check import check_method, strategy_conflicts
    from lorabench.methods.catalog import load_presets

    method = check_method(dict(load_presets(ROOT / "conf" / "method")[preset]))
    return {s: "; ".join(why) for s in STRATEGIES if (why := strategy_conflicts(method, s))}


def measure(preset: str, data: Path, scratch: Path, timeout_s: int) -> dict:
    import shutil

    from lorabench.launch import accelerate_launch

    results = scratch / preset
    shutil.rmtree(results, ignore_errors=True)
    launch = accelerate_launch(2, "no", [__file__, "--worker", preset, "--data", str(data), "--scratch", str(results)])
    env = {**os.environ, "ACCELERATE_LAUNCHED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stdout + proc.stderr)[-2000:] if proc.returncode else ""
    except subprocess.TimeoutExpired:
        tail = f"timed out after {timeout_s} s"
    cells = verdict(
        {s: _record(results / s) for s in STRATEGIES},
        refusal_of(preset),
        {s: _tensor_difference(results / "ddp", results / s) for s in COMPARED},
    )
    if tail and not all("verdict" in c and c["verdict"] != "no record" for c in cells.values()):
        cells["launch_error"] = tail
    cells["seconds"] = round(time.perf_counter() - t0, 1)
    return cells


def write_markdown(matrix: dict, path: Path) -> None:
    lines = [
        "# Method x strategy: measured on 2 CPU processes",
        "",
        f"`python scripts/strategy_matrix.py`: each preset {STEPS} steps on tiny_bert / generated SST-2, "
        "dropout 0, global batch 4 (2 per process), under "
        + ", ".join(f"`hardware={HARDWARE[s]}`" for s in STRATEGIES)
        + f". Each partitioned strategy must equal DDP: losses within {LOSS_RTOL:g} relative, saved tensors "
        f"within {TENSOR_ATOL:g}. Optimizer state is bytes per process; the difference is the largest over "
        "the compared strategies.",
        "",
        "| preset | " + " | ".join(STRATEGIES) + " | optimizer state (" + " / ".join(STRATEGIES) + ") "
        "| max saved-tensor difference | notes |",
        "|---|" + "---|" * (len(STRATEGIES) + 3),
    ]
    for preset, cells in sorted(matrix["presets"].items()):
        got = {s: cells.get(s, {}) for s in STRATEGIES}
        notes = "; ".join(
            f"{s}: {c.get('reason') or c.get('error')}" for s, c in got.items() if c.get("reason") or c.get("error")
        )
        diffs = [c["max_tensor_difference"] for c in got.values() if c.get("max_tensor_difference") is not None]
        state = " / ".join(str(c.get("optimizer_state_bytes", "-")) for c in got.values())
        lines.append(
            f"| {preset} | " + " | ".join(c.get("verdict", "-") for c in got.values()) + f" | {state} | "
            f"{f'{max(diffs):.1e}' if diffs else '-'} | {notes.replace('|', '/')[:300]} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", help="presets to measure (default: every preset that runs on CPU)")
    parser.add_argument("--out", default=str(ROOT / "results" / "strategies"))
    parser.add_argument("--again", action="store_true", help="measure presets already in matrix.json again")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per preset (both strategies)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.data), Path(args.scratch))
        return 0
    import tempfile

    from lorabench.methods.catalog import load_presets
    from tests.conftest import write_sst2

    presets = load_presets(ROOT / "conf" / "method")
    runnable = [p for p, raw in presets.items() if not raw.get("requires_cuda") and "experts" not in raw]
    chosen = args.presets or runnable
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "matrix.json"
    matrix = json.loads(path.read_text()) if path.exists() else {"presets": {}}
    matrix["protocol"] = {"steps": STEPS, "loss_rtol": LOSS_RTOL, "tensor_atol": TENSOR_ATOL, "hardware": HARDWARE}
    matrix["not_run"] = {p: "needs CUDA or trained experts" for p in presets if p not in runnable}
    with tempfile.TemporaryDirectory(prefix="lorabench-strategies-") as scratch:
        data = write_sst2(Path(scratch) / "SST-2")
        for preset in chosen:
            if preset in matrix["presets"] and not args.again:
                continue
            cells = measure(preset, data, Path(scratch) / "runs", args.timeout)
            matrix["presets"][preset] = cells
            verdicts = ", ".join(f"{s} {cells[s].get('verdict')}" for s in STRATEGIES)
            print(f"{preset}: {verdicts} ({cells['seconds']} s)")
            path.write_text(json.dumps(matrix, indent=2) + "\n")
            write_markdown(matrix, out / "matrix.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
