"""THE training loop: build -> init -> optimizer -> accelerator.prepare -> train/eval -> record.

On Hugging Face Accelerate, in pieces that :func:`train` calls top to bottom and a protocol can call
too: :func:`build_run_parts` (data, model, targets, the method's context, the budget; shared with
lorabench.export's rebuild), :func:`prepare_run` (the method applied, the schedule,
``accelerator.prepare``), :func:`resume` (a checkpoint into a :class:`TrainState`),
:func:`train_steps`, :func:`evaluate`, :func:`save_state` and :func:`finish_record`. What training
has reached is the :class:`TrainState` (saved whole in every checkpoint); what the pieces share is the
:class:`Run`. Methods act only at the named points: ``Initializer.before_adapter`` / ``after_adapter``
(with a few real training batches), the optimizer they build, and ``Procedure.after_backward`` (after
the last backward of a step, before clipping and ``optimizer.step()``) and ``Procedure.on_step_end``.
Every run leaves a record, also when it fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from lorabench.analysis.forgetting import forgetting_after, forgetting_before
from lorabench.analysis.intruders import model_intruders, snapshot_to_file
from lorabench.budget import apply_budget, solve_run_budget
from lorabench.checkpoint import load_checkpoint, newest_usable, restore_rng, save_checkpoint
from lorabench.config import RunConfig
from lorabench.console import progress
from lorabench.data.base import collate, count_tokens, resolve_primary
from lorabench.data.cache import cached_features
from lorabench.distributed import (
    accelerator_for,
    autocast_sharded,
    drop_empty_groups,
    end_world_of_one,
    plan_sharding,
    uses_deepspeed,
    whole_model,
    zero_backward,
)
from lorabench.fingerprint import local_inputs
from lorabench.frozen_dtype import store_frozen_linears
from lorabench.lm_loss import forward_loss
from lorabench.measure import PeakMemory, optimizer_state_bytes, parameter_counts, provenance
from lorabench.memory import release_freed_memory
from lorabench.methods.adapters.layer import is_conv1d
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.methods.spec import MethodSpec
from lorabench.models import load_model
from lorabench.outputs import save_outputs
from lorabench.registry import DATASETS
from lorabench.results.record import RECORD_NAME, SCHEMA_VERSION, config_hash, now, protocol_view, read_record, run_id
from lorabench.results.runs import Recorder, close_segment, open_segment, this_owner
from lorabench.run_lock import claim_run, describe_holder
from lorabench.trackers import start_tracker

HEAD_MODULES = ("classifier", "score", "lm_head", "qa_outputs")


class RunCanceled(Exception):
    """The run was stopped by SIGTERM/SIGINT (Ctrl-C, SLURM preemption)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class StopFlag:
    """First SIGTERM/SIGINT/SIGUSR2: outside the training loop, raise at once; inside it, finish the
    current optimizer step (never a half-applied update), checkpoint, then stop. A second signal stops
    at once, without a checkpoint, still through the ``except`` that records ``canceled``. Once
    ``finishing`` (the record's last write), further signals are ignored so that the write completes.

    SIGUSR2 is what SLURM (and submitit, ``--signal=USR2@90``) sends before a time limit or on
    preemption. After the record is closed, ``__exit__`` hands it to the handler that was installed
    before the run (submitit's checkpoint-and-requeue under ``+sweep=slurm``): the job is requeued with
    the same overrides and, with ``resume=auto``, continues from the checkpoint just written."""

    def __init__(self):
        self.signal_name: str | None = None
        self.in_loop = False
        self.finishing = False
        self.previous = {}

    def __enter__(self) -> "StopFlag":
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        handed = self.previous.get(signal.SIGUSR2)
        if self.signal_name == "SIGUSR2" and callable(handed):  # e.g. submitit: requeue the job
            handed(signal.SIGUSR2, None)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.finishing:
            return
        if self.signal_name is not None:
            raise RunCanceled(f"received {name} again: stopped at once, without a checkpoint")
        self.signal_name = name
        if not self.in_loop:
            raise RunCanceled(f"received {name}")


def _fault_injection_step() -> int | None:
    """LORABENCH_FAULT_AT_STEP=k makes the run send itself SIGTERM (``LORABENCH_FAULT_SIGNAL``:
    another signal name, e.g. SIGUSR2) after step k (tests use it to prove that an interrupted and
    resumed run equals an uninterrupted one). With ``LORABENCH_FAULT_ONCE=FILE`` only while FILE
    does not exist (it is created when the fault fires): a requeued job then runs to the end."""
    value = os.environ.get("LORABENCH_FAULT_AT_STEP")
    once = os.environ.get("LORABENCH_FAULT_ONCE")
    if once and Path(once).exists():
        return None
    return int(value) if value else None


def _inject_fault() -> None:
    once = os.environ.get("LORABENCH_FAULT_ONCE")
    if once:
        Path(once).touch()
    os.kill(os.getpid(), getattr(signal, os.environ.get("LORABENCH_FAULT_SIGNAL", "SIGTERM")))


def resolve_targets(spec: MethodSpec, default: list[str], model: torch.nn.Module) -> list[str]:
    """Module-name suffixes the method targets: the model's defaults, every linear layer except the
    task head ("all-linear"), or an explicit list (checked against the model). Linear layers are
    ``nn.Linear`` and GPT-2's ``Conv1D`` (c_attn, c_proj, c_fc)."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)]
    if spec.target_modules == "default":
        targets = list(default)
    elif spec.target_modules == "all-linear":
        targets = sorted({n.split(".")[-1] for n in linear_names} - set(HEAD_MODULES))
    else:
        targets = list(spec.target_modules)
    suffixes = {n.split(".")[-1] for n in linear_names} | set(linear_names)
    missing = [t for t in targets if t not in suffixes and not any(n.endswith("." + t) for n in linear_names)]
    if missing or not targets:
        raise ValueError(
            f"method.target_modules {missing or targets} match no linear layer of the model; "
            f"linear layers are named: {', '.join(sorted({n.split('.')[-1] for n in linear_names}))}"
        )
    return targets


def _infinite(loader: DataLoader):
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def _evaluate(task, model, tokenizer, examples, cfg: RunConfig, accelerator: Accelerator) -> tuple[dict, list]:
    """Each process predicts its shard, at the run's precision (bf16 autocast when training used it:
    generation calls the inner model, past Accelerate's autocast wrapper); predictions are gathered in
    order and scored once."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(examples), world))
    # FSDP: shards gathered, so processes may run different numbers of batches
    with whole_model(unwrapped), accelerator.autocast():
        preds = task.predict(unwrapped, tokenizer, [examples[i] for i in indices], cfg.dataset, accelerator.device)
    gathered = sorted(gather_object(list(zip(indices, preds))) if world > 1 else zip(indices, preds))
    predictions = [p for _, p in gathered]
    model.train()
    return task.score(predictions, examples), predictions


def existing_record(cfg_dict: dict, results_dir: str) -> tuple[str, Path, dict | None]:
    rid = run_id(cfg_dict)
    path = Path(results_dir) / rid / RECORD_NAME
    record = None
    if path.exists():
        try:
            record = read_record(path)
        except (OSError, ValueError):
            record = None
    return rid, path, record


def _completed(previous: dict | None, cfg: RunConfig) -> bool:
    return bool(previous) and previous.get("status") == "completed" and not cfg.force


def _skip_completed(rid: str, record_path: Path, previous: dict) -> dict:
    print(f"[lorabench] skip {rid}: a completed record exists at {record_path} (force=true reruns it)")
    return {**previous, "skipped": True}


def _skip_owned(rid: str, holder: dict, is_main: bool) -> dict:
    """What a run that another process trains returns (the sweep summary shows it as skipped)."""
    if is_main:
        print(f"[lorabench] skip {rid}: another process ({describe_holder(holder)}) is training it")
    return {"run_id": rid, "status": "locked", "skipped": True, "owner": holder}


def _resume_entry(checkpoint, skipped_checkpoints: list[dict]) -> dict:
    """One ``resumed_from`` entry: the checkpoint used and the newer ones skipped (file and reason)."""
    return {
        "step": checkpoint.meta["step"],
        "checkpoint": str(checkpoint.path),
        "verified": checkpoint.verified,
        "at": now(),
        "skipped": skipped_checkpoints,
    }


def _open_record(
    cfg: RunConfig,
    cfg_dict: dict,
    spec: MethodSpec,
    command: str,
    record_path: Path,
    previous,
    task,
    accelerator: Accelerator,
) -> Recorder:
    """This segment's record, written as ``running`` (with a previous unfinished record carried over
    when resuming), its heartbeat started. Only the main process writes."""
    record = _new_record(cfg, cfg_dict, spec, command, task, accelerator)
    warn_emulated_bf16(cfg, accelerator)
    recorder = Recorder(record_path, record, accelerator.is_main_process)
    open_segment(recorder.record, previous, resume=cfg.resume == "auto")
    recorder.write()
    recorder.start_heartbeat()
    return recorder


def _new_record(cfg: RunConfig, cfg_dict: dict, spec: MethodSpec, command: str, task, accelerator) -> dict:
    primary = resolve_primary(task, cfg.dataset)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id(cfg_dict),
        "status": "running",
        "error": None,
        "started_at": now(),
        "finished_at": None,
        "config": protocol_view(cfg_dict),  # written with its paths portable, as is every string (Recorder.write)
        "config_hash": config_hash(cfg_dict),
        "inputs": local_inputs(cfg_dict),  # each local data/model folder: portable path, sha256, files
        "command": command,
        "method": spec.describe(),
        "model": {"name": cfg.model.name, "source": None},
        "dataset": {"name": cfg.dataset.name, "version": task.version, "source": None},
        "metrics": {"primary": primary, "higher_is_better": task.higher_is_better[primary], "report": cfg.train.report},
        "history": [],
        "train_log": [],
        "samples": [],
        "cost": {},
        "method_report": {},
        "hardware": {
            "device": str(accelerator.device),
            "device_name": _device_name(accelerator),
            "num_processes": accelerator.num_processes,
            "strategy": cfg.hardware.strategy,
            "mixed_precision": cfg.hardware.mixed_precision,
            "frozen_dtype": cfg.hardware.frozen_dtype,
            "micro_batch_size": cfg.hardware.micro_batch_size,
            "gradient_accumulation": cfg.gradient_accumulation(),
            "global_batch_size": cfg.train.global_batch_size,
            "torch_threads": torch.get_num_threads(),
            "cpu_bf16": cpu_bf16_instructions() if accelerator.device.type == "cpu" else None,
        },
        "provenance": provenance(),
        "owner": this_owner(),
        "progress": {"step": 0, "max_steps": cfg.train.max_steps},
    }


# -- the pieces of a run ----------------------------------------------------------------------------
@dataclasses.dataclass
class Timers:
    """Seconds spent applying the method, training and evaluating. ``train_time_s`` is the training
    time of the steps the model holds (``restored_train_s`` of it restored from a checkpoint), not
    counting a stretch in progress, which started at ``stretch_start`` (None while not training)."""

    init_time_s: float = 0.0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    restored_train_s: float = 0.0
    stretch_start: float | None = None

    def start(self) -> None:
        self.stretch_start = time.perf_counter()

    def stop(self) -> None:
        self.train_time_s += time.perf_counter() - self.stretch_start
        self.stretch_start = None

    def train_time_now(self) -> float:
        running = time.perf_counter() - self.stretch_start if self.stretch_start else 0.0
        return self.train_time_s + running

    def as_dict(self) -> dict:
        return {"init_time_s": self.init_time_s, "train_time_s": self.train_time_s, "eval_time_s": self.eval_time_s}


@dataclasses.dataclass
class TrainState:
    """Where training stands, all of what a checkpoint keeps besides tensors and RNG states:
    optimizer steps taken, micro-batches drawn (the data position: a resumed run skips as many),
    tokens seen, the best evaluation, the skipped non-finite steps, the evaluation history, the
    train log and the sample predictions. ``history``, ``train_log`` and ``samples`` are the very
    lists of the run's record (``train`` binds them), so the record and a checkpoint always agree."""

    step: int = 0
    consumed: int = 0
    tokens: int = 0
    best: dict | None = None
    skipped: list = dataclasses.field(default_factory=list)
    history: list = dataclasses.field(default_factory=list)
    train_log: list = dataclasses.field(default_factory=list)
    samples: list = dataclasses.field(default_factory=list)
    timers: Timers = dataclasses.field(default_factory=Timers)
    terms: dict = dataclasses.field(default_factory=dict)  # the last step's regularizer terms, for the log

    def state_dict(self) -> dict:
        """The checkpoint's ``meta.json`` (lorabench.checkpoint.save_checkpoint adds ``step``)."""
        return {
            "consumed": self.consumed,
            "tokens": self.tokens,
            "best": self.best,
            "skipped": self.skipped,
            "history": self.history,
            "train_log": self.train_log,
            "samples": self.samples,
            "train_time_s": self.timers.train_time_now(),
        }

    def load_state_dict(self, meta: dict) -> None:
        """Restore from a checkpoint's ``meta.json``; its training time counts as restored."""
        self.step, self.consumed, self.tokens = meta["step"], meta["consumed"], meta["tokens"]
        self.best, self.skipped = meta["best"], meta["skipped"]
        self.history, self.train_log, self.samples = meta["history"], meta["train_log"], meta["samples"]
        self.timers.restored_train_s = meta["train_time_s"]
        self.timers.train_time_s += meta["train_time_s"]


@dataclasses.dataclass
class RunParts:
    """A run built up to its method: data, model, training batches and the method's context, with
    the spec after the budget solved its size knob. :func:`build_run_parts` makes it for the training
    loop and for lorabench.export's rebuild, so both draw everything from the seed in one order."""

    cfg: RunConfig
    spec: MethodSpec  # budget applied
    task: Any
    splits: Any
    model: torch.nn.Module
    tokenizer: Any
    features: Any
    loader: DataLoader  # shuffled training micro-batches (seeded)
    targets: list[str]
    lr: float
    ctx: MethodContext
    budget: dict | None  # the solved budget, when cfg.budget is active


class CalibrationBatches:
    """The first ``count`` batches of the unshuffled training features: the same for every seed, so
    initializations can be cached and compared (``MethodContext.calibration_batches``)."""

    def __init__(self, loader: DataLoader, count: int, show_progress: bool):
        self.loader, self.count, self.show_progress = loader, count, show_progress

    def __call__(self):
        batches = itertools.islice(iter(self.loader), self.count)
        if not self.show_progress:
            return batches
        return progress(batches, "calibrate", total=min(self.count, len(self.loader)))


def training_batches(
    cfg: RunConfig,
    task,
    examples: list[dict],
    tokenizer,
    accelerator: Accelerator | None = None,
    seed: int | None = None,
) -> tuple[Any, DataLoader]:
    """The tokenized features of ``examples`` (cached; rank 0 tokenizes first, the others read the
    cache) and their shuffled micro-batches (dropping the last partial one), shuffled by ``seed``
    (default ``cfg.seed``). Raises ValueError when there is not one whole micro-batch."""
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        features = cached_features(task, examples, tokenizer, cfg.dataset)
    loader = DataLoader(
        features,
        batch_size=cfg.hardware.micro_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(cfg.seed if seed is None else seed),
    )
    if len(loader) == 0:
        raise ValueError(
            f"the training split has {len(features)} examples, fewer than one micro-batch "
            f"(hardware.micro_batch_size={cfg.hardware.micro_batch_size})"
        )
    return features, loader


def build_run_parts(
    cfg: RunConfig, spec: MethodSpec, task, accelerator: Accelerator | None = None, record: dict | None = None
) -> RunParts:
    """``set_seed``, the data, the model, the features and loaders, the targets, the method's context,
    the budget: the order everything drawn from the seed depends on.

    With an ``accelerator`` (training): rank 0 tokenizes first, gradient checkpointing is turned on as
    configured, the model-source, generated-data and budget lines are printed and calibration shows a
    progress bar. Without one (lorabench.export's one-process CPU rebuild) none of these. ``record``,
    when given, gets the dataset, model source and budget as soon as each is known (a failure later
    still records them)."""
    set_seed(cfg.seed)
    splits = task.load(cfg.dataset)
    if record is not None:
        record["dataset"].update(
            {
                "source": splits.source,
                "train_split": splits.train_split,
                "eval_split": splits.eval_split,
                "train_size": len(splits.train),
                "eval_size": len(splits.eval),
                "protocol": task.protocol(cfg.dataset),
                "eval_schedule": {"every": cfg.train.eval_every, "at_end": True},
                "notes": splits.notes,
            }
        )
    loaded = load_model(cfg.model, task.head, task.num_labels)
    model, tokenizer = loaded.model, loaded.tokenizer
    if record is not None:
        record["model"]["source"] = loaded.source
    if accelerator is not None:
        if loaded.source.get("kind") != "hub":
            print(
                f"[lorabench] model {cfg.model.name}: loaded from {loaded.source.get('kind')} source "
                f"({loaded.source.get('package') or loaded.source.get('path') or loaded.source.get('config')})"
            )
        if splits.source.get("kind") == "generated":
            print(f"[lorabench] WARNING dataset {cfg.dataset.name}: {splits.source['note']}")
    features, loader = training_batches(cfg, task, splits.train, tokenizer, accelerator)
    collate_fn = loader.collate_fn
    if accelerator is not None and cfg.hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    targets = resolve_targets(spec, cfg.model.target_modules, model)
    lr = spec.lr or cfg.train.lr
    calibration_loader = DataLoader(
        features, batch_size=cfg.hardware.micro_batch_size, shuffle=False, collate_fn=collate_fn
    )
    cfg_dict = dataclasses.asdict(cfg)
    calibration_key = config_hash(
        {
            "model": cfg_dict["model"],
            "dataset": cfg_dict["dataset"],
            "targets": targets,
            "batches": cfg.train.init_batches,
            "micro": cfg.hardware.micro_batch_size,
        }
    )[:16]
    ctx = MethodContext(
        targets,
        task.head,
        lr,
        cfg.train.weight_decay,
        cfg.train.max_steps,
        cfg.seed,
        CalibrationBatches(calibration_loader, cfg.train.init_batches, show_progress=accelerator is not None),
        calibration_key,
        tokenizer=tokenizer,
    )
    solved = None
    if cfg.budget.active():
        solved = solve_run_budget(model, spec, ctx, cfg.budget)
        spec = apply_budget(spec, solved)
        if record is not None:
            record["method"] = spec.describe()
            record["method_report"]["budget"] = solved
            for name in solved["knob"].split("="):  # tables group by the solved value, not the preset's
                record["config"]["method"][name] = solved["value"]
        if accelerator is not None and accelerator.is_main_process:
            print(
                f"[lorabench] budget {solved['budget']:,} {solved['unit']}: {solved['knob']}={solved['value']} "
                f"(predicted {solved['predicted']:,}{', capped' if solved['capped'] else ''})"
            )
    return RunParts(cfg, spec, task, splits, model, tokenizer, features, loader, targets, lr, ctx, solved)


@dataclasses.dataclass
class Run:
    """What the loop's pieces share: the built parts with the method applied and everything passed
    through ``accelerator.prepare``, the run's record (through its recorder), tracker and signal flag.
    ``batches`` (the endless training micro-batches, at the state's data position) and the progress
    ``bar`` are set once the run has resumed."""

    parts: RunParts
    model: torch.nn.Module  # prepared
    optimizer: Any
    scheduler: Any
    procedure: Any
    loader: DataLoader  # prepared
    accelerator: Accelerator
    recorder: Recorder
    tracker: Any
    stop: StopFlag
    pretrained: Any  # target weights before training, on disk (cfg.analysis.intruders; analysis.intruders.SavedWeights)
    batches: Iterator | None = None
    bar: Any = None
    forgetting: Any = None  # held-out texts and the base model's perplexity (cfg.analysis.forgetting)
    regularizer: Any = None  # a Regularizer instance, or None

    @property
    def cfg(self) -> RunConfig:
        return self.parts.cfg

    @property
    def record(self) -> dict:
        return self.recorder.record

    @property
    def run_dir(self) -> Path:
        return self.recorder.path.parent


def prepare_run(
    parts: RunParts, accelerator: Accelerator, recorder: Recorder, tracker, stop: StopFlag, timers: Timers
) -> Run:
    """Apply the method (its time is ``init_time_s``), build the LR schedule, ``accelerator.prepare``
    everything, record the parameter counts and print the run's opening lines."""
    cfg, spec, record = parts.cfg, parts.spec, recorder.record
    expected = expected_trainable(parts.model, spec, parts.ctx)
    pretrained = (
        snapshot_to_file(parts.model, parts.targets) if cfg.analysis.intruders and accelerator.is_main_process else None
    )
    forgetting = forgetting_before(parts, accelerator) if cfg.analysis.forgetting else None
    t0 = time.perf_counter()
    base_params = {id(p) for p in parts.model.parameters()}
    built = apply_method(parts.model, spec, parts.ctx)
    model, optimizer, procedure = built.model, built.optimizer, built.procedure
    if cfg.hardware.frozen_dtype != "float32":  # the base's frozen Linear weights, stored in bf16 once
        record["cost"]["frozen_cast_params"] = store_frozen_linears(model, cfg.hardware.frozen_dtype, base_params)
    timers.init_time_s = time.perf_counter() - t0
    drop_empty_groups(accelerator, optimizer)
    warmup = math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps)
    scheduler = get_scheduler(
        cfg.train.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=max(cfg.train.max_steps, 1)
    )
    plan_sharding(accelerator, model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, parts.loader, scheduler)
    autocast_sharded(accelerator, model)
    trainable, total = parameter_counts(model)
    record["cost"].update({"trainable_params": trainable, "total_params": total, "expected_trainable_params": expected})
    record["method_report"].update({"target_modules": parts.targets, "lr": parts.lr, **parts.ctx.extras})
    if accelerator.is_main_process:
        accum, processes = cfg.gradient_accumulation(), accelerator.num_processes
        _print_start(cfg, spec, accum, processes, trainable, total, parts.features, parts.lr, parts.targets)
    run = Run(parts, model, optimizer, scheduler, procedure, loader, accelerator, recorder, tracker, stop, pretrained)
    run.forgetting, run.regularizer = forgetting, built.regularizer
    return run


def resume(run: Run, state: TrainState) -> None:
    """With ``resume=auto``, restore the newest usable checkpoint into the run and ``state``; bind the
    state's lists into the record; position the training batches where the state says (and, after a
    checkpoint, the RNG states as they were), so the run continues as an uninterrupted one would."""
    cfg, accelerator, record = run.cfg, run.accelerator, run.record
    is_main = accelerator.is_main_process
    checkpoint, passed_over = (None, [])
    if cfg.resume == "auto":  # the newest checkpoint whose files verify; newer broken ones are named
        checkpoint, passed_over = newest_usable(run.run_dir, accelerator.process_index, warn=is_main)
    if checkpoint:
        meta = load_checkpoint(
            checkpoint,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            procedure=run.procedure,
            accelerator=accelerator,
            regularizer=run.regularizer,
        )
        state.load_state_dict(meta)
        record["resumed_from"].append(_resume_entry(checkpoint, passed_over))
        if is_main:
            print(f"[lorabench] resuming {record['run_id']} from step {state.step} ({checkpoint.path})")
    # without a checkpoint the run starts over, the log carried over from a previous record with it
    record.update(history=state.history, train_log=state.train_log, samples=state.samples)
    record["method_report"]["skipped_nonfinite_steps"] = state.skipped  # kept also if the run fails later
    run.recorder.step = state.step
    run.recorder.write()
    run.batches = _infinite(run.loader)
    for _ in range(state.consumed):  # the same data order as an uninterrupted run
        next(run.batches)
    if checkpoint:
        restore_rng(checkpoint)


def train_steps(run: Run, state: TrainState, n: int = 1) -> None:
    """Up to ``n`` optimizer steps, fewer at ``train.max_steps`` or once a stop signal arrived. A step
    whose loss or gradient is not finite is skipped (``train.nonfinite=skip``, at most
    ``train.max_skipped_steps``) and does not count: the next batches are tried."""
    target = min(state.step + n, run.cfg.train.max_steps)
    while state.step < target:
        loss_value = optimizer_step(run, state)
        if loss_value is None:
            continue
        _log_step(run, state, loss_value)
        if run.stop.signal_name:
            return


def optimizer_step(run: Run, state: TrainState) -> float | None:
    """One optimizer step over ``gradient_accumulation`` micro-batches; its loss, or None when it was
    skipped as non-finite (raises FloatingPointError when it may not be skipped)."""
    cfg, model, accelerator, procedure = run.cfg, run.model, run.accelerator, run.procedure
    regularizer = run.regularizer
    batches: list[dict] = []  # the step's micro-batches, drawn in the first pass, reused by the others
    for index in range(regularizer.passes if regularizer else 1):
        if regularizer:
            regularizer.before_forward(model, state.step, index)
        pass_loss, pass_terms = backward_pass(run, state, batches)
        if index == 0:
            loss_sum, term_sums = pass_loss, pass_terms
        if regularizer:
            regularizer.after_backward(model, state.step, index)
    step_tokens = sum(count_tokens(batch) for batch in batches)
    state.terms = {name: accelerator.reduce(value, reduction="mean").item() for name, value in term_sums.items()}
    if procedure:
        procedure.after_backward(state.step)
    grad_norm = None
    if cfg.train.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    loss_value = accelerator.reduce(loss_sum, reduction="mean").item()
    if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
        where = _first_nonfinite_grad(model)
        event = {"step": state.step + 1, "loss": loss_value, "first_nonfinite_grad": where}
        if cfg.train.nonfinite == "stop" or len(state.skipped) >= cfg.train.max_skipped_steps:
            raise FloatingPointError(
                f"non-finite loss {loss_value} or gradient at step {state.step + 1} "
                f"(first non-finite gradient: {where}); train.nonfinite="
                f"{cfg.train.nonfinite}, {len(state.skipped)} steps skipped before"
            )
        state.skipped.append(event)
        run.optimizer.zero_grad(set_to_none=True)
        print(f"[lorabench] skipped step {state.step + 1}: non-finite loss/gradient ({where})")
        return None
    run.optimizer.step()
    if not getattr(run.optimizer, "step_was_skipped", False):  # fp16: the scaler skipped an overflowing step
        run.scheduler.step()  # once per optimizer step, at any number of processes (new_accelerator)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if run.recorder is not None:  # a federated client trains without a record of its own
        run.recorder.step = state.step
    if procedure:
        procedure.on_step_end(state.step)
    if regularizer:
        regularizer.on_step_end(state.step)
    state.tokens += int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), reduction="sum"))
    return loss_value


def backward_pass(run: Run, state: TrainState, batches: list[dict]) -> tuple[torch.Tensor, dict]:
    """Forward and backward over the step's ``gradient_accumulation`` micro-batches: drawn from the
    data into ``batches`` when it is empty (the first pass), else those again (a regularizer's further
    passes). Returns the summed (1/accum-weighted) loss and the regularizer's terms."""
    cfg, model, accelerator, procedure = run.cfg, run.model, run.accelerator, run.procedure
    accum = cfg.gradient_accumulation()
    zero = uses_deepspeed(accelerator)  # DeepSpeed steps inside the last micro-batch's backward
    loss_sum, term_sums = 0.0, {}
    for micro in range(accum):
        if len(batches) <= micro:
            batches.append(next(run.batches))
            state.consumed += 1
        batch = batches[micro]
        sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            loss, terms = micro_batch_loss(run, batch)
            loss = loss / accum
            extra = procedure.extra_loss(model) if procedure else None  # gradient only, not the logged loss
            objective = loss if extra is None else loss + extra / accum
            for name, term in terms.items():  # the regularizer's terms: in the gradient, logged apart
                objective = objective + term / accum
                term_sums[name] = term_sums.get(name, 0.0) + term.detach().float() / accum
            if zero:
                zero_backward(accelerator, objective, last_micro_batch=micro == accum - 1)
            else:
                accelerator.backward(objective)
        loss_sum += loss.detach().float()
    return loss_sum, term_sums


def micro_batch_loss(run: Run, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's training loss and the regularizer's named terms for it. A regularizer that
    reads the model's outputs gets the model's own forward (``Regularizer.needs_outputs``)."""
    cfg, model, regularizer = run.cfg, run.model, run.regularizer
    if regularizer is None:
        return forward_loss(model, batch, cfg.hardware.labelled_logits, cfg.hardware.loss_chunk), {}
    outputs = None
    if regularizer.needs_outputs:
        outputs = model(**batch, output_hidden_states=regularizer.needs_outputs == "hidden_states")
        loss = outputs.loss
    else:
        loss = forward_loss(model, batch, cfg.hardware.labelled_logits, cfg.hardware.loss_chunk)
    return loss, regularizer.loss_terms(model, batch, outputs)


def _log_step(run: Run, state: TrainState, loss_value: float) -> None:
    """The train log (every ``train.log_every`` steps, the first and the last), tracker and progress bar."""
    cfg, step = run.cfg, state.step
    train_time = state.timers.train_time_now()
    lr = run.scheduler.get_last_lr()[0]
    if step % cfg.train.log_every == 0 or step == 1 or step == cfg.train.max_steps:
        entry = {"step": step, "loss": loss_value, "lr": lr}
        if state.terms:
            entry["terms"] = dict(state.terms)
        state.train_log.append(entry)
        run.recorder.write()
        if run.tracker:
            terms = {f"train/{name}": value for name, value in state.terms.items()}
            run.tracker.log({"train/loss": loss_value, "train/lr": lr, **terms}, step=step)
    run.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{state.tokens / max(train_time, 1e-9):.0f}")
    run.bar.update(1)


def evaluate(run: Run, state: TrainState) -> dict:
    """Score the eval split now (every process predicts its shard); the metrics go to the history, the
    record's final and best metrics, the first sample predictions, the tracker; the record is written."""
    parts, record = run.parts, run.record
    primary, higher = record["metrics"]["primary"], record["metrics"]["higher_is_better"]
    t_eval = time.perf_counter()
    scores, predictions = _evaluate(parts.task, run.model, parts.tokenizer, parts.splits.eval, run.cfg, run.accelerator)
    state.timers.eval_time_s += time.perf_counter() - t_eval
    if scores.get("missing"):  # metrics this environment cannot compute, with the reason
        record["metrics"]["missing"] = scores["missing"]
    metrics = {k: v for k, v in scores.items() if k != "missing"}
    state.history.append({"step": state.step, "metrics": metrics})
    best = state.best
    if best is None or (metrics[primary] > best[primary] if higher else metrics[primary] < best[primary]):
        state.best = {"step": state.step, **metrics}
    record["metrics"].update({"final": metrics, "best": state.best})
    if not state.samples and isinstance(predictions[0], str):
        state.samples.extend(
            {"input": e.get("question", e.get("mr", e.get("texts"))), "prediction": p}
            for e, p in zip(parts.splits.eval[:3], predictions[:3])
        )
    if run.accelerator.is_main_process:
        print(
            f"[lorabench] eval @ step {state.step}: "
            + ", ".join(f"{k}={v:.4f}" if v is not None else f"{k}=missing" for k, v in metrics.items())
        )
        if run.tracker:
            run.tracker.log({f"eval/{k}": v for k, v in metrics.items() if v is not None}, step=state.step)
    run.recorder.write()
    return metrics


def _scores(run: Run) -> dict:
    """The eval split's scores alone (a procedure's post-training evaluations)."""
    parts = run.parts
    return _evaluate(parts.task, run.model, parts.tokenizer, parts.splits.eval, run.cfg, run.accelerator)[0]


def save_state(run: Run, state: TrainState) -> None:
    """A checkpoint of the run at ``state.step`` (lorabench.checkpoint)."""
    save_checkpoint(
        run.run_dir,
        state.step,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        procedure=run.procedure,
        meta=state.state_dict(),
        accelerator=run.accelerator,
        keep=run.cfg.checkpoint.keep,
        regularizer=run.regularizer,
    )


def record_training_cost(run: Run, state: TrainState) -> None:
    """Optimizer state size, tokens trained on and throughput (after the training clock stopped)."""
    train_time_s = state.timers.train_time_s
    run.record["cost"].update(
        {
            "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
            "train_tokens": state.tokens,
            "tokens_per_s": state.tokens / train_time_s if state.step else None,
        }
    )


def finish_record(run: Run) -> None:
    """After the final evaluation: the procedure's post-training evaluations (e.g. DyLoRA's rank
    curve), the intruder-dimension analysis, the saved outputs, the procedure's report; ``completed``."""
    parts, record, accelerator = run.parts, run.record, run.accelerator
    is_main, primary = accelerator.is_main_process, record["metrics"]["primary"]
    extra = getattr(run.procedure, "post_training_evaluations", None)
    curve = extra(functools.partial(_scores, run)) if extra else None
    if curve:  # e.g. DyLoRA: the trained model evaluated at every rank
        record["method_report"]["rank_curve"] = {rank: m[primary] for rank, m in curve.items()}
        record["method_report"]["rank_curve_metrics"] = curve
    if run.pretrained is not None and is_main:
        analysis = run.cfg.analysis
        report = model_intruders(
            run.pretrained, accelerator.unwrap_model(run.model), analysis.intruder_top_k, analysis.intruder_epsilon
        )
        record["analysis"] = report.as_dict()
        run.pretrained.discard()
        run.pretrained = None
    if run.forgetting is not None and is_main:
        trained = accelerator.unwrap_model(run.model)
        record.setdefault("analysis", {})["forgetting"] = forgetting_after(run.forgetting, trained, accelerator.device)
        run.forgetting = None
    if is_main:
        outputs = save_outputs(
            accelerator.unwrap_model(run.model),
            parts.tokenizer,
            run.run_dir,
            has_adapter="adapter" in parts.spec.components,
            hub_id=run.cfg.model.hub_id,
            save_model=run.cfg.checkpoint.save_model,
        )
        record["outputs"] = outputs
        record["cost"]["adapter_file_bytes"] = outputs.get("adapter", {}).get("bytes")
    if run.procedure:
        record["method_report"].update(run.procedure.state())
    if run.regularizer:
        run.regularizer.on_train_end(accelerator.unwrap_model(run.model))
        record["method_report"]["regularizer"] = run.regularizer.state()
    record["status"] = "completed"


def _error(exc: BaseException, step: int, canceled: bool) -> dict:
    """The record's ``error`` for a run that stopped at ``step``."""
    if canceled:
        return {"type": type(exc).__name__, "message": str(exc) or "interrupted", "step": step}
    error = {"type": type(exc).__name__, "message": str(exc), "step": step, "traceback": traceback.format_exc(limit=8)}
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        error["hint"] = (
            "out of memory: lower hardware.micro_batch_size (the global batch is kept "
            "by gradient accumulation) or set hardware.gradient_checkpointing=true"
        )
    return error


def _close_record(recorder: Recorder, state: TrainState, wall_time_s: float, memory: PeakMemory) -> None:
    """The segment's end: costs (timers, peak memory), the segment closed, the record's last write."""
    record, timers = recorder.record, state.timers
    recorder.stop_heartbeat()
    record["cost"].update({**timers.as_dict(), "peak_memory": memory.report()})
    segment_timers = {**timers.as_dict(), "train_time_s": timers.train_time_s - timers.restored_train_s}
    close_segment(record, state.step, wall_time_s, segment_timers)  # wall: all segments
    record["finished_at"] = now()
    recorder.write()


# -- the run ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Session:
    """What a run's body gets from :func:`run_with_record`: the config and method, the task, the
    accelerator, the open record (through its recorder), the tracker, the signal flag and the
    training state whose timers and step the record's costs and error report."""

    cfg: RunConfig
    spec: MethodSpec
    task: Any
    accelerator: Accelerator
    recorder: Recorder
    tracker: Any
    stop: StopFlag
    state: TrainState

    @property
    def record(self) -> dict:
        return self.recorder.record


def train(cfg: RunConfig, spec: MethodSpec, command: str = "") -> dict:
    """One run, start to record, as its protocol organises it (``protocol=single``: build it, resume
    it, train and evaluate on schedule, finish its record; lorabench.protocols for the others).
    Every run leaves a record."""
    from lorabench.protocols import body_for

    return run_with_record(cfg, spec, command, body_for(cfg.protocol.name))


def train_single(session: Session) -> None:
    """The single-run protocol: the loop's pieces top to bottom."""
    cfg, state, stop = session.cfg, session.state, session.stop
    parts = build_run_parts(cfg, session.spec, session.task, session.accelerator, session.record)
    run = prepare_run(parts, session.accelerator, session.recorder, session.tracker, stop, state.timers)
    train_prepared(session, run)


def train_prepared(session: Session, run: Run, before_final_evaluation: Callable | None = None) -> None:
    """A prepared run (method applied) resumed, trained to ``train.max_steps`` with evaluations and
    checkpoints on schedule, evaluated at the end and its record finished: the single-run loop,
    which protocols that only change how the model is built reuse (lorabench.protocols.compressed).
    ``before_final_evaluation(run, state)``, when given, runs after training, before the final
    evaluation (LoRAM's recovery of the uncompressed weights)."""
    cfg, state, stop, parts = session.cfg, session.state, session.stop, run.parts
    resume(run, state)

    run.model.train()
    fault_step = _fault_injection_step()
    state.timers.start()
    stop.in_loop = True
    run.bar = tqdm(
        total=cfg.train.max_steps,
        initial=state.step,
        disable=not (session.accelerator.is_main_process and cfg.progress),
        desc=parts.spec.label,
        unit="step",
    )
    while state.step < cfg.train.max_steps:
        train_steps(run, state, 1)
        step = state.step
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            state.timers.stop()
            stop.in_loop = False
            evaluate(run, state)
            stop.in_loop = True
            state.timers.start()
        if step == fault_step:
            _inject_fault()
        if stop.signal_name:
            if cfg.checkpoint.every:
                save_state(run, state)
            raise RunCanceled(f"received {stop.signal_name} after step {step}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save_state(run, state)
    stop.in_loop = False
    run.bar.close()
    state.timers.stop()
    record_training_cost(run, state)
    if before_final_evaluation is not None:
        before_final_evaluation(run, state)
    with whole_model(run.accelerator.unwrap_model(run.model)):  # FSDP: the analyses and outputs see whole tensors
        evaluate(run, state)
        finish_record(run)


def run_with_record(cfg: RunConfig, spec: MethodSpec, command: str, body: Callable[[Session], None]) -> dict:
    """Run ``body`` inside a run's record: skip it if completed (or trained by another process),
    claim the run id, open (or continue) the record, start the tracker and the signal flag, and
    whatever ``body`` does or raises, close the record with its status, costs and error. Every
    protocol (lorabench.protocols) runs its body through here."""
    cfg_dict = dataclasses.asdict(cfg)
    rid, record_path, previous = existing_record(cfg_dict, cfg.results_dir)
    if _completed(previous, cfg):
        return _skip_completed(rid, record_path, previous)

    accelerator = accelerator_for(cfg)
    is_main = accelerator.is_main_process
    claim = claim_run(record_path.parent, accelerator)  # one trainer per run id, held to the end
    if not claim.owned:
        return _skip_owned(rid, claim.holder, is_main)
    _, _, previous = existing_record(cfg_dict, cfg.results_dir)  # as the previous owner left it
    if _completed(previous, cfg):
        claim.release()
        return _skip_completed(rid, record_path, previous)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    if cfg.hardware.release_memory:
        said = release_freed_memory()
        if is_main:
            print(f"[lorabench] {said}")
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    try:
        recorder = _open_record(cfg, cfg_dict, spec, command, record_path, previous, task, accelerator)
    except BaseException:  # the record could not be started: let the next process try
        claim.release()
        raise
    record = recorder.record
    if is_main:
        print(f"[lorabench] training {rid} ({describe_holder(record['owner'])}); record: {record_path}")
    stop = StopFlag().__enter__()
    t_start = time.perf_counter()
    state = TrainState()
    tracker = None
    memory = PeakMemory().__enter__()
    try:
        if is_main:
            tracker = start_tracker(cfg.tracker, rid, cfg_dict, record_path.parent, Path(cfg.results_dir))
        body(Session(cfg, spec, task, accelerator, recorder, tracker, stop, state))
    except (RunCanceled, KeyboardInterrupt) as exc:
        record["status"] = "canceled"
        record["error"] = _error(exc, state.step, canceled=True)
        raise
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = _error(exc, state.step, canceled=False)
        raise
    finally:
        stop.finishing = True
        if record["status"] == "running":  # a second signal landed before the except clause set it
            record["status"] = "canceled" if stop.signal_name else "failed"
        memory.__exit__(None, None, None)
        if state.timers.stretch_start is not None:  # interrupted while training
            state.timers.stop()
        try:
            _close_record(recorder, state, time.perf_counter() - t_start, memory)
        finally:
            stop.__exit__(None, None, None)
            claim.release()
            end_world_of_one()
        if tracker:
            tracker.finish(record["status"] == "completed", record, record_path)
    if is_main:
        primary = record["metrics"]["primary"]
        final = record["metrics"]["final"][primary]
        print(
            f"[lorabench] {rid}: {primary}={final:.4f} ({record['dataset']['name']}, "
            f"{record['dataset']['source']['kind']} "
            f"source) in {record['cost']['wall_time_s']:.1f}s; record: {record_path}"
        )
    return record


def _first_nonfinite_grad(model) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX) and aarch64 ("bf16" feature)


def cpu_bf16_instructions(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has bf16 arithmetic instructions (a flag of ``CPU_BF16_FLAGS`` in
    /proc/cpuinfo); None where that cannot be read. Without them bf16 autocast on the CPU is emulated:
    measured on an AMD EPYC without AVX-512, a SmolLM2-135M Track B run trained at 3 tokens/s under
    bf16 autocast against 300 tokens/s in fp32 on a CPU that has them."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.split(":", 1)[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & set(CPU_BF16_FLAGS)) if flags else None


def warn_emulated_bf16(cfg: RunConfig, accelerator: Accelerator) -> None:
    """One line before training when bf16 autocast will run on a CPU without bf16 instructions."""
    if (
        cfg.hardware.mixed_precision == "bf16"
        and accelerator.device.type == "cpu"
        and accelerator.is_main_process
        and cpu_bf16_instructions() is False
    ):
        print(
            "[lorabench] warning: hardware.mixed_precision=bf16 on a CPU without bf16 instructions "
            f"({'/'.join(CPU_BF16_FLAGS)} absent from /proc/cpuinfo): autocast is emulated and can be ~100x slower "
            "than fp32; hardware.mixed_precision=no trains in fp32"
        )


def _device_name(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    import platform

    return platform.processor() or platform.machine()


def _print_start(cfg, spec, accum, processes, trainable, total, features, lr, targets) -> None:
    mean_len = sum(len(f["input_ids"]) for f in features) / len(features)
    print(
        f"[lorabench] method={spec.label} ({spec.describe()['backed_by']}) model={cfg.model.name} "
        f"dataset={cfg.dataset.name} seed={cfg.seed}\n"
        f"[lorabench] global batch {cfg.train.global_batch_size} = micro {cfg.hardware.micro_batch_size} x "
        f"processes {processes} x accumulation {accum}; ~{mean_len * cfg.train.global_batch_size:.0f} tokens/step "
        f"(mean length {mean_len:.0f}); {cfg.train.max_steps} steps, lr {lr:g}, {cfg.train.schedule} schedule\n"
        f"[lorabench] trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
        f"targets: {', '.join(targets)}"
    )
