"""``lorabench bench [overrides...] [--methods ...]``: what one training step of each method costs.

Per method preset, in a fresh process of its own (so that peak memory and Accelerate's state are the
method's alone), the run is built exactly as ``lorabench train`` builds it (lorabench.train's
``build_run_parts`` and ``prepare_run``) and then stepped two ways, alternating A B B A ...:

- **harness**: ``lorabench.train.train_steps``, the loop every run uses (Accelerate's wrappers,
  gradient clipping, the loss reduction, token counting, the train log);
- **raw**: a hand-written loop over the same model, the same unwrapped optimizer and schedule and the
  method's own hooks (procedure, regularizer passes, gradient clipping when the run clips):
  ``loss.backward(); opt.step(); sched.step(); opt.zero_grad()``.

The ratio harness / raw is the harness's overhead for that method, measured in one process on the
same weights, so machine noise largely cancels. Besides it: the first step (projector SVDs and other
step-0 work land there), tokens/s, the FLOPs of a step counted by ``torch.utils.flop_counter`` and
their rate as a share of a square matmul's rate measured on the spot in the run's precision (on a
GPU also the card's published peak where known), the peak memory (RSS; on CUDA the allocator's
peak), and the optimizer-state bytes measured beside an analytic formula (Adam moments of every
trainable tensor, or lorabench.budget's formula for the GaLore family).

The table and a JSON file (settings, provenance, one row per method, failures included) go to
``--out``; completed rows are kept, so a long bench resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lorabench.errors import ConfigError

# SmolLM2-135M on the offline GSM-symbolic data (about 215 tokens a sequence with the chat template),
# batch 4, one process
BENCH_DEFAULTS = (
    "model=smollm2_135m",
    "dataset=gsm_symbolic",
    "train.global_batch_size=4",
    "hardware.micro_batch_size=4",
    "train.eval_every=0",
    "analysis.intruders=false",
    "checkpoint.every=0",
    "progress=false",
    "tracker=none",
    "protocol=single",
)
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of the CUDA device name
CARD_BF16_PEAKS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 125e12}
MATMUL_SIZE = 2048
COLUMNS = (
    ("method", "method"),
    ("first step s", "first_step_s"),
    ("step s", "harness_step_s"),
    ("raw s", "raw_step_s"),
    ("harness/raw", "overhead_ratio"),
    ("tokens/s", "tokens_per_s"),
    ("GFLOP/step", "gflop_per_step"),
    ("GFLOP/s", "gflop_per_s"),
    ("of peak", "peak_share"),
    ("peak MB", "peak_memory_mb"),
    ("opt state MB", "optimizer_state_mb"),
    ("formula MB", "formula_state_mb"),
    ("formula", "formula"),
    ("init s", "init_s"),
    ("status", "status"),
)


# -- measuring one method (the child process) -------------------------------------------------------
def matmul_rate(device, dtype, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of a ``size`` x ``size`` matmul on ``device`` in ``dtype``: the best of ``repeats``."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def adam_state_bytes(model) -> int:
    """Adam's two moments for every trainable tensor, in the tensor's dtype, and torch's per-tensor
    step counter (a float32 scalar)."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters() if p.requires_grad)


def formula_state_bytes(model, spec, ctx) -> tuple[int | None, str]:
    """The analytic optimizer-state size and its name: lorabench.budget's formula for the GaLore family
    (optimizer only), Adam's moments of the trainable tensors for the Adam-based optimizers, else none."""
    from lorabench.budget import STATE_FORMULAS, optimizer_state_bytes

    name = spec.names["optimizer"]
    if name in STATE_FORMULAS and spec.names["adapter"] == "none" and spec.names["procedure"] == "none":
        return optimizer_state_bytes(model, spec, ctx), name
    if name in ("adamw", "loraplus", "lorafa", "allora"):
        return adam_state_bytes(model), "adam: 2 moments + step"
    return None, "-"


class NoRecord:
    """The record a bench run writes to: kept in memory, never on disk (a bench is not a result)."""

    def __init__(self):
        self.record = {"cost": {}, "method_report": {}}
        self.step = 0
        self.path = Path(os.devnull)

    def write(self) -> None:
        pass


def raw_step(run, batches, step: int) -> None:
    """One optimizer step by hand over the same objects the harness steps: ``gradient_accumulation``
    micro-batches, the method's hooks, no Accelerate wrapper, no reduction, logging or token counting."""
    import torch

    cfg, model, procedure, regularizer = run.cfg, run.model, run.procedure, run.regularizer
    optimizer, scheduler = run.optimizer.optimizer, run.scheduler.scheduler
    device = run.accelerator.device
    accum = cfg.gradient_accumulation()
    micro_batches = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(accum)]
    for index in range(regularizer.passes if regularizer else 1):
        if regularizer:
            regularizer.before_forward(model, step, index)
        for batch in micro_batches:
            loss = _raw_loss(run, batch)
            extra = procedure.extra_loss(model) if procedure else None
            ((loss if extra is None else loss + extra) / accum).backward()
        if regularizer:
            regularizer.after_backward(model, step, index)
    if procedure:
        procedure.after_backward(step)
    if cfg.train.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if procedure:
        procedure.on_step_end(step + 1)
    if regularizer:
        regularizer.on_step_end(step + 1)


def _raw_loss(run, batch):
    """The training loss of one micro-batch with the regularizer's terms added (the harness's own loss
    function: the comparison is of the loops around it)."""
    from lorabench.train import micro_batch_loss

    loss, terms = micro_batch_loss(run, batch)
    return loss + sum(terms.values()) if terms else loss


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _counted_flops(run, batches, step: int) -> int:
    """FLOPs of one raw step, counted by torch's flop counter (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        raw_step(run, batches, step)
    return counter.get_total_flops()


def measure_method(overrides: list[str], steps: int) -> dict:
    """Build the run of ``overrides`` as training does and time ``steps`` harness and raw steps each."""
    import itertools

    import torch
    from tqdm.auto import tqdm

    from lorabench.config_store import compose
    from lorabench.data.base import count_tokens
    from lorabench.distributed import accelerator_for
    from lorabench.fingerprint import portable_text
    from lorabench.measure import PeakMemory, optimizer_state_bytes
    from lorabench.registry import DATASETS
    from lorabench.train import StopFlag, TrainState, build_run_parts, prepare_run, resume, train_steps
    from lorabench.validate import build_run

    cfg, spec = build_run(compose(overrides))
    if cfg.hardware.num_processes != 1:
        raise ConfigError(f"lorabench bench runs one process; got hardware.num_processes={cfg.hardware.num_processes}")
    with PeakMemory() as memory:
        accelerator = accelerator_for(cfg)
        if cfg.hardware.num_threads:
            torch.set_num_threads(cfg.hardware.num_threads)
        task = DATASETS.get(cfg.dataset.name, where="dataset")
        state = TrainState()
        sources = {"model": {}, "dataset": {}}
        parts = build_run_parts(cfg, spec, task, accelerator, record=sources)
        run = prepare_run(parts, accelerator, NoRecord(), None, StopFlag(), state.timers)
        resume(run, state)
        run.bar = tqdm(disable=True)
        run.model.train()
        device = accelerator.device
        # every step of both loops (and the FLOP count) runs on the same micro-batches: one optimizer
        # step's worth, drawn once, so step times compare shape for shape
        fixed = list(itertools.islice(run.batches, cfg.gradient_accumulation()))
        run.batches = itertools.cycle(fixed)
        raw_batches = itertools.cycle(fixed)
        tokens = sum(count_tokens(b) for b in fixed)
        state.timers.start()
        first = _timed(lambda: train_steps(run, state, 1), device)
        flops = _counted_flops(run, raw_batches, state.step)
        harness, raw = [], []
        for i in range(steps):  # A B B A ...: neither loop always runs first
            pair = (("harness", harness), ("raw", raw))
            for name, times in pair if i % 2 == 0 else reversed(pair):
                if name == "harness":
                    times.append(_timed(lambda: train_steps(run, state, 1), device))
                else:
                    times.append(_timed(lambda: raw_step(run, raw_batches, state.step), device))
        state.timers.stop()
        measured_state = optimizer_state_bytes(run.optimizer)
        formula, formula_name = formula_state_bytes(accelerator.unwrap_model(run.model), parts.spec, parts.ctx)
    dtype = torch.bfloat16 if cfg.hardware.mixed_precision == "bf16" else torch.float32
    peak_rate = matmul_rate(device, dtype)
    step_s = statistics.median(harness)
    peaks = memory.report()
    card_peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        card_peak = next((v for k, v in CARD_BF16_PEAKS.items() if k in name), None)
    return {
        "method": spec.label,
        "status": "ok",
        "first_step_s": first,
        "harness_step_s": step_s,
        "raw_step_s": statistics.median(raw),
        # the median of the pairs' ratios (pair i: the i-th harness and raw step, run back to back)
        "overhead_ratio": statistics.median(h / r for h, r in zip(harness, raw)),
        "harness_steps_s": harness,
        "raw_steps_s": raw,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "gflop_per_step": flops / 1e9,
        "gflop_per_s": flops / step_s / 1e9,
        "matmul_gflop_per_s": peak_rate / 1e9,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "peak_share": flops / step_s / peak_rate,
        "card_peak_share": flops / step_s / card_peak if card_peak else None,
        "peak_memory_mb": (peaks["cuda_allocated_bytes"] or peaks["cpu_peak_rss_bytes"]) / 2**20,
        "peak_memory_kind": "cuda allocated" if peaks["cuda_allocated_bytes"] else "cpu rss",
        "optimizer_state_mb": measured_state / 2**20,
        "formula_state_mb": formula / 2**20 if formula is not None else None,
        "formula": formula_name,
        "init_s": state.timers.init_time_s,
        "trainable_params": run.record["cost"]["trainable_params"],
        # the machine's folders in portable form (<lorabench-cache>/..., <site-packages>/...): rows are committed
        "model_source": json.loads(portable_text(json.dumps(sources["model"].get("source")))),
        "dataset_source": json.loads(portable_text(json.dumps(sources["dataset"].get("source")))),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def child_main(argv: list[str]) -> int:
    """``python -m lorabench.bench OUT.json STEPS overrides...``: one method's row, written to OUT.json."""
    out, steps, overrides = Path(argv[0]), int(argv[1]), argv[2:]
    from lorabench.console import quiet_libraries

    quiet_libraries()
    try:
        row = measure_method(overrides, steps)
    except ConfigError as exc:  # a configuration this machine cannot run (QLoRA's 4-bit base needs CUDA)
        row = {"status": "not run", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the row says what failed
        row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    out.write_text(json.dumps(row, indent=1))
    return 0 if row["status"] == "ok" else 1


# -- the command ------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    from lorabench.launch import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def method_overrides(method: str, overrides: list[str]) -> list[str]:
    return [*BENCH_DEFAULTS, f"method={method}", *overrides]


def check_methods(methods: list[str], overrides: list[str], every_preset: bool = False) -> dict[str, str]:
    """Every method's config composes and validates (torch-free) before the first is measured. With
    ``every_preset`` (``--methods all``) a preset that cannot run as it stands (X-LoRA needs trained
    experts) is returned with its reason instead of stopping the bench; named methods must all be valid."""
    from lorabench.config_store import compose
    from lorabench.validate import check_overrides, validate_config

    valid = preset_names()
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; valid choices: {', '.join(valid)}")
    check_overrides(overrides)
    unrunnable = {}
    for method in methods:
        try:
            cfg = validate_config(compose(method_overrides(method, overrides)))
        except ConfigError as exc:
            if not every_preset:
                raise
            unrunnable[method] = str(exc)
            continue
        if cfg.hardware.num_processes != 1:
            raise ConfigError(
                f"lorabench bench measures one process; got hardware.num_processes={cfg.hardware.num_processes}"
            )
    return unrunnable


def run_child(method: str, overrides: list[str], steps: int, out: Path, timeout_s: float) -> dict:
    """One method in its own process; a crash or timeout becomes a failed row."""
    row_file = out / f".row_{method}.json"
    row_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "lorabench.bench", str(row_file), str(steps), *method_overrides(method, overrides)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"preset": method, "method": method, "status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    if not row_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        error = f"exit {proc.returncode}: {' | '.join(tail)}"
        return {"preset": method, "method": method, "status": "failed", "error": error}
    row = json.loads(row_file.read_text())
    row_file.unlink()
    return {"preset": method, **row, "method": row.get("method", method)}


# columns whose values are ratios or shares: three decimals at any size (1.02 must not read 1.0)
RATIO_COLUMNS = {"overhead_ratio", "peak_share"}


def _cell(value, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key in RATIO_COLUMNS or abs(value) < 1:
            return f"{value:.3f}"
        return f"{value:,.1f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def bench_table(result: dict) -> str:
    """The bench's rows as a Markdown table with the settings above it."""
    settings = result["settings"]
    lines = [
        f"# lorabench bench: {settings['name']}",
        "",
        f"Overrides: `{' '.join(settings['overrides']) or '(bench defaults)'}` on top of "
        f"`{' '.join(BENCH_DEFAULTS)}`; {settings['steps']} harness and {settings['steps']} raw steps per "
        "method, alternating, after a first step and a FLOP-counted step. Times are medians; "
        "`harness/raw` is the median over pairs of the harness's step over the hand-written loop's on the same "
        "objects and micro-batches; "
        "`of peak` is the counted FLOP rate over a square matmul's rate measured on the spot.",
        "",
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in result["rows"]:
        cells = [_cell(row.get(key), key) for _, key in COLUMNS]
        if row["status"] != "ok":
            cells[-1] = f"{row['status']}: {row.get('error', '')}".replace("|", "/")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_result(result: dict, json_path: Path, md_path: Path) -> None:
    json_path.write_text(json.dumps(result, indent=1))
    md_path.write_text(bench_table(result))


def bench_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorabench bench",
        description="Step time, tokens/s, FLOP/s and its share of a matmul peak, peak memory, optimizer state "
        "(measured and analytic) and the harness's overhead over a raw loop, per method preset.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method (as for train)")
    parser.add_argument("--methods", default="lora,full,galore", help="comma-separated presets, or 'all'")
    parser.add_argument("--steps", type=int, default=5, help="harness steps and raw steps per method (each)")
    parser.add_argument("--out", default="results/bench", help="folder of the table and JSON")
    parser.add_argument("--name", default="bench", help="file stem in --out (default: bench)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one method may take")
    parser.add_argument("--force", action="store_true", help="measure again methods the JSON already has")
    args = parser.parse_intermixed_args(argv)
    methods = preset_names() if args.methods == "all" else [m for m in args.methods.split(",") if m]
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    unrunnable = check_methods(methods, args.overrides, every_preset=args.methods == "all")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{args.name}.json", out / f"{args.name}.md"
    from lorabench.measure import provenance

    settings = {"name": args.name, "overrides": args.overrides, "defaults": list(BENCH_DEFAULTS), "steps": args.steps}
    result = {"settings": settings, "provenance": provenance(), "rows": []}
    if json_path.exists() and not args.force:
        previous = json.loads(json_path.read_text())
        if previous["settings"] == settings:
            result["rows"] = [r for r in previous["rows"] if r["status"] == "ok"]
    done = {r["preset"] for r in result["rows"]}
    for method, reason in unrunnable.items():
        print(f"[lorabench bench] {method}: not run as a preset: {reason}")
        result["rows"] = [r for r in result["rows"] if r.get("preset") != method]
        result["rows"].append({"preset": method, "method": method, "status": "not run", "error": reason})
    result["rows"].sort(key=lambda r: r["preset"])
    for method in methods:
        if method in unrunnable:
            continue
        if method in done:
            print(f"[lorabench bench] {method}: kept from {json_path}")
            continue
        print(f"[lorabench bench] {method} ...", flush=True)
        row = run_child(method, args.overrides, args.steps, out, args.timeout)
        result["rows"] = [r for r in result["rows"] if r.get("preset") != method] + [row]
        result["rows"].sort(key=lambda r: r["preset"])
        write_result(result, json_path, md_path)
        summary = (
            f"step {row['harness_step_s']:.3f} s, harness/raw {row['overhead_ratio']:.3f}, "
            f"{row['tokens_per_s']:.0f} tokens/s, {row['peak_share']:.0%} of peak"
            if row["status"] == "ok"
            else row["error"]
        )
        print(f"[lorabench bench] {method}: {summary}", flush=True)
    write_result(result, json_path, md_path)
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    print(f"[lorabench bench] table: {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
