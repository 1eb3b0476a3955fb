"""THE training loop: build -> init -> optimizer -> accelerator.prepare -> train/eval -> record.

One flat function, :func:`train`, on Hugging Face Accelerate. Methods act only at the named points:
``Initializer.before_adapter`` / ``after_adapter`` (with a few real training batches), the
optimizer they build, and ``Procedure.after_backward`` (after the last backward of a step, before
clipping and ``optimizer.step()``) and ``Procedure.on_step_end``. Every run leaves a record, also
when it fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import time
import traceback
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from lorabench.analysis.intruders import model_intruders, snapshot
from lorabench.budget import apply_budget, solve_run_budget
from lorabench.checkpoint import load_checkpoint, newest_usable, restore_rng, save_checkpoint
from lorabench.config import RunConfig
from lorabench.console import progress
from lorabench.data.base import collate, count_tokens, resolve_primary
from lorabench.data.cache import cached_features
from lorabench.fingerprint import local_inputs, portable_command, portable_config, portable_source
from lorabench.measure import PeakMemory, optimizer_state_bytes, parameter_counts, provenance
from lorabench.methods.adapters.layer import is_conv1d
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.methods.spec import MethodSpec
from lorabench.models import load_model
from lorabench.outputs import save_outputs
from lorabench.registry import DATASETS
from lorabench.results.record import RECORD_NAME, SCHEMA_VERSION, config_hash, now, read_record, run_id
from lorabench.results.runs import Recorder, close_segment, open_segment, this_owner
from lorabench.run_lock import claim_run, describe_holder
from lorabench.trackers import start_tracker

HEAD_MODULES = ("classifier", "score", "lm_head", "qa_outputs")


class RunCanceled(Exception):
    """The run was stopped by SIGTERM/SIGINT (Ctrl-C, SLURM preemption)."""


class StopFlag:
    """First SIGTERM/SIGINT: outside the training loop, raise at once; inside it, finish the current
    optimizer step (never a half-applied update), checkpoint, then stop. A second signal stops at once,
    without a checkpoint, still through the ``except`` that records ``canceled``. Once ``finishing``
    (the record's last write), further signals are ignored so that the write completes."""

    def __init__(self):
        self.signal_name: str | None = None
        self.in_loop = False
        self.finishing = False
        self.previous = {}

    def __enter__(self) -> "StopFlag":
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

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
    """LORABENCH_FAULT_AT_STEP=k makes the run send itself SIGTERM after step k (tests use it to
    prove that an interrupted and resumed run equals an uninterrupted one)."""
    value = os.environ.get("LORABENCH_FAULT_AT_STEP")
    return int(value) if value else None


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
    """Each process predicts its shard; predictions are gathered in order and scored once."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(examples), world))
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
        "config": portable_config(cfg_dict),  # local paths relative to the working directory
        "config_hash": config_hash(cfg_dict),
        "inputs": local_inputs(cfg_dict),  # each local data/model folder: portable path, sha256, files
        "command": portable_command(command),
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
            "mixed_precision": cfg.hardware.mixed_precision,
            "micro_batch_size": cfg.hardware.micro_batch_size,
            "gradient_accumulation": cfg.gradient_accumulation(),
            "global_batch_size": cfg.train.global_batch_size,
            "torch_threads": torch.get_num_threads(),
        },
        "provenance": provenance(),
        "owner": this_owner(),
        "progress": {"step": 0, "max_steps": cfg.train.max_steps},
    }


def train(cfg: RunConfig, spec: MethodSpec, command: str = "") -> dict:
    cfg_dict = dataclasses.asdict(cfg)
    rid, record_path, previous = existing_record(cfg_dict, cfg.results_dir)
    if _completed(previous, cfg):
        return _skip_completed(rid, record_path, previous)

    accum = cfg.gradient_accumulation()
    accelerator = Accelerator(cpu=cfg.hardware.device == "cpu", mixed_precision=cfg.hardware.mixed_precision)
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
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    try:
        recorder = _open_record(cfg, cfg_dict, spec, command, record_path, previous, task, accelerator)
    except BaseException:  # the record could not be started: let the next process try
        claim.release()
        raise
    record = recorder.record
    primary = record["metrics"]["primary"]
    higher = record["metrics"]["higher_is_better"]
    if is_main:
        print(f"[lorabench] training {rid} ({describe_holder(record['owner'])}); record: {record_path}")
    stop = StopFlag().__enter__()
    t_start = time.perf_counter()
    timers = {"init_time_s": 0.0, "train_time_s": 0.0, "eval_time_s": 0.0}
    restored_train_s = 0.0  # training time of the steps restored from a checkpoint
    tracker = None
    memory = PeakMemory().__enter__()
    step, t_train = 0, None  # t_train: start of the current training stretch (None while not training)
    try:
        if is_main:
            tracker = start_tracker(cfg.tracker, rid, cfg_dict, record_path.parent, Path(cfg.results_dir))
        set_seed(cfg.seed)
        splits = task.load(cfg.dataset)
        record["dataset"].update(
            {
                "source": portable_source(splits.source),
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
        record["model"]["source"] = portable_source(loaded.source)
        if loaded.source.get("kind") != "hub":
            print(
                f"[lorabench] model {cfg.model.name}: loaded from {loaded.source.get('kind')} source "
                f"({loaded.source.get('package') or loaded.source.get('path') or loaded.source.get('config')})"
            )
        if splits.source.get("kind") == "generated":
            print(f"[lorabench] WARNING dataset {cfg.dataset.name}: {splits.source['note']}")
        with accelerator.main_process_first():  # rank 0 tokenizes and caches, the others read the cache
            features = cached_features(task, splits.train, tokenizer, cfg.dataset)
        pad_id = tokenizer.pad_token_id
        loader = DataLoader(
            features,
            batch_size=cfg.hardware.micro_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=lambda b: collate(b, pad_id),
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        if len(loader) == 0:
            raise ValueError(
                f"the training split has {len(features)} examples, fewer than one micro-batch "
                f"(hardware.micro_batch_size={cfg.hardware.micro_batch_size})"
            )
        if cfg.hardware.gradient_checkpointing:
            model.gradient_checkpointing_enable()

        # -- method: initializer, adapter, optimizer, procedure --------------------------------------
        targets = resolve_targets(spec, cfg.model.target_modules, model)
        lr = spec.lr or cfg.train.lr

        calibration_loader = DataLoader(
            features, batch_size=cfg.hardware.micro_batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad_id)
        )

        def calibration_batches():  # the same batches for every seed, so inits can be cached and compared
            batches = itertools.islice(iter(calibration_loader), cfg.train.init_batches)
            return progress(batches, "calibrate", total=min(cfg.train.init_batches, len(calibration_loader)))

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
            calibration_batches,
            calibration_key,
        )
        if cfg.budget.active():
            solved = solve_run_budget(model, spec, ctx, cfg.budget)
            spec = apply_budget(spec, solved)
            record["method"] = spec.describe()
            record["method_report"]["budget"] = solved
            for name in solved["knob"].split("="):  # tables group by the solved value, not the preset's
                record["config"]["method"][name] = solved["value"]
            if is_main:
                print(
                    f"[lorabench] budget {solved['budget']:,} {solved['unit']}: {solved['knob']}={solved['value']} "
                    f"(predicted {solved['predicted']:,}{', capped' if solved['capped'] else ''})"
                )
        expected = expected_trainable(model, spec, ctx)
        pretrained = snapshot(model, targets) if cfg.analysis.intruders else None
        t0 = time.perf_counter()
        built = apply_method(model, spec, ctx)
        model, optimizer, procedure = built.model, built.optimizer, built.procedure
        timers["init_time_s"] = time.perf_counter() - t0
        warmup = math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps)
        scheduler = get_scheduler(
            cfg.train.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=max(cfg.train.max_steps, 1)
        )
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        trainable, total = parameter_counts(model)
        record["cost"].update(
            {"trainable_params": trainable, "total_params": total, "expected_trainable_params": expected}
        )
        record["method_report"].update({"target_modules": targets, "lr": lr, **ctx.extras})
        if is_main:
            _print_start(cfg, spec, accum, accelerator.num_processes, trainable, total, features, lr, targets)

        # -- train / eval ---------------------------------------------------------------------------
        best = None

        def evaluate_now():
            nonlocal best
            t_eval = time.perf_counter()
            scores, predictions = _evaluate(task, model, tokenizer, splits.eval, cfg, accelerator)
            timers["eval_time_s"] += time.perf_counter() - t_eval
            if scores.get("missing"):  # metrics this environment cannot compute, with the reason
                record["metrics"]["missing"] = scores["missing"]
            metrics = {k: v for k, v in scores.items() if k != "missing"}
            record["history"].append({"step": step, "metrics": metrics})
            better = best is None or (metrics[primary] > best[primary] if higher else metrics[primary] < best[primary])
            if better:
                best = {"step": step, **metrics}
            record["metrics"].update({"final": metrics, "best": best})
            if not record["samples"] and isinstance(predictions[0], str):
                record["samples"] = [
                    {"input": e.get("question", e.get("mr", e.get("texts"))), "prediction": p}
                    for e, p in zip(splits.eval[:3], predictions[:3])
                ]
            if is_main:
                print(
                    f"[lorabench] eval @ step {step}: "
                    + ", ".join(f"{k}={v:.4f}" if v is not None else f"{k}=missing" for k, v in metrics.items())
                )
                if tracker:
                    tracker.log({f"eval/{k}": v for k, v in metrics.items() if v is not None}, step=step)
            recorder.write()

        # -- resume -------------------------------------------------------------------------------
        run_dir = record_path.parent
        tokens, consumed, skipped = 0, 0, []
        checkpoint, passed_over = (None, [])
        if cfg.resume == "auto":  # the newest checkpoint whose files verify; newer broken ones are named
            checkpoint, passed_over = newest_usable(run_dir, accelerator.process_index, warn=is_main)
        if checkpoint:
            meta = load_checkpoint(
                checkpoint,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                procedure=procedure,
                accelerator=accelerator,
            )
            step, consumed, tokens, best, skipped = (
                meta["step"],
                meta["consumed"],
                meta["tokens"],
                meta["best"],
                meta["skipped"],
            )
            record.update(history=meta["history"], train_log=meta["train_log"], samples=meta["samples"])
            restored_train_s = meta["train_time_s"]
            timers["train_time_s"] += restored_train_s
            record["resumed_from"].append(_resume_entry(checkpoint, passed_over))
            if is_main:
                print(f"[lorabench] resuming {rid} from step {step} ({checkpoint.path})")
        else:  # nothing to resume: the run starts over, the carried-over log with it
            record.update(history=[], train_log=[])
        record["method_report"]["skipped_nonfinite_steps"] = skipped  # kept also if the run fails later
        recorder.step = step
        recorder.write()
        batches = _infinite(loader)
        for _ in range(consumed):  # the same data order as an uninterrupted run
            next(batches)
        if checkpoint:
            restore_rng(checkpoint)

        def checkpoint_now():
            meta = {
                "consumed": consumed,
                "tokens": tokens,
                "best": best,
                "skipped": skipped,
                "history": record["history"],
                "train_log": record["train_log"],
                "samples": record["samples"],
                "train_time_s": timers["train_time_s"] + (time.perf_counter() - t_train if t_train else 0.0),
            }
            save_checkpoint(
                run_dir,
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                procedure=procedure,
                meta=meta,
                accelerator=accelerator,
                keep=cfg.checkpoint.keep,
            )

        # -- train ----------------------------------------------------------------------------------
        model.train()
        fault_step = _fault_injection_step()
        t_train = time.perf_counter()
        stop.in_loop = True
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=step,
            disable=not (is_main and cfg.progress),
            desc=spec.label,
            unit="step",
        )
        while step < cfg.train.max_steps:
            loss_sum, step_tokens = 0.0, 0
            for micro in range(accum):
                batch = next(batches)
                consumed += 1
                step_tokens += count_tokens(batch)
                sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    loss = model(**batch).loss / accum
                    extra = procedure.extra_loss(model) if procedure else None  # gradient only, not the logged loss
                    accelerator.backward(loss if extra is None else loss + extra / accum)
                loss_sum += loss.detach().float()
            if procedure:
                procedure.after_backward(step)
            grad_norm = None
            if cfg.train.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            loss_value = accelerator.reduce(loss_sum, reduction="mean").item()
            if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                where = _first_nonfinite_grad(model)
                event = {"step": step + 1, "loss": loss_value, "first_nonfinite_grad": where}
                if cfg.train.nonfinite == "stop" or len(skipped) >= cfg.train.max_skipped_steps:
                    raise FloatingPointError(
                        f"non-finite loss {loss_value} or gradient at step {step + 1} "
                        f"(first non-finite gradient: {where}); train.nonfinite="
                        f"{cfg.train.nonfinite}, {len(skipped)} steps skipped before"
                    )
                skipped.append(event)
                optimizer.zero_grad(set_to_none=True)
                print(f"[lorabench] skipped step {step + 1}: non-finite loss/gradient ({where})")
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            recorder.step = step
            if procedure:
                procedure.on_step_end(step)
            tokens += int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), reduction="sum"))
            elapsed = time.perf_counter() - t_train
            if step % cfg.train.log_every == 0 or step == 1 or step == cfg.train.max_steps:
                record["train_log"].append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]})
                recorder.write()
                if tracker:
                    tracker.log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            bar.set_postfix(
                loss=f"{loss_value:.4f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
                tok_s=f"{tokens / max(elapsed + timers['train_time_s'], 1e-9):.0f}",
            )
            bar.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                timers["train_time_s"] += time.perf_counter() - t_train
                t_train = None
                stop.in_loop = False
                evaluate_now()
                stop.in_loop = True
                t_train = time.perf_counter()
            if step == fault_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if stop.signal_name:
                if cfg.checkpoint.every:
                    checkpoint_now()
                raise RunCanceled(f"received {stop.signal_name} after step {step}")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                checkpoint_now()
        stop.in_loop = False
        bar.close()
        timers["train_time_s"] += time.perf_counter() - t_train
        t_train = None
        record["cost"].update(
            {
                "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                "train_tokens": tokens,
                "tokens_per_s": tokens / timers["train_time_s"] if step else None,
            }
        )
        evaluate_now()
        extra = getattr(procedure, "post_training_evaluations", None)
        curve = extra(lambda: _evaluate(task, model, tokenizer, splits.eval, cfg, accelerator)[0]) if extra else None
        if curve:  # e.g. DyLoRA: the trained model evaluated at every rank
            record["method_report"]["rank_curve"] = {rank: m[primary] for rank, m in curve.items()}
            record["method_report"]["rank_curve_metrics"] = curve
        if pretrained is not None and is_main:
            report = model_intruders(
                pretrained, accelerator.unwrap_model(model), cfg.analysis.intruder_top_k, cfg.analysis.intruder_epsilon
            )
            record["analysis"] = report.as_dict()
            pretrained = None
        if is_main:
            outputs = save_outputs(
                accelerator.unwrap_model(model),
                tokenizer,
                record_path.parent,
                has_adapter="adapter" in spec.components,
                hub_id=cfg.model.hub_id,
                save_model=cfg.checkpoint.save_model,
            )
            record["outputs"] = outputs
            record["cost"]["adapter_file_bytes"] = outputs.get("adapter", {}).get("bytes")
        if procedure:
            record["method_report"].update(procedure.state())
        record["status"] = "completed"
    except (RunCanceled, KeyboardInterrupt) as exc:
        record["status"] = "canceled"
        record["error"] = {"type": type(exc).__name__, "message": str(exc) or "interrupted", "step": step}
        raise
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "step": step,
            "traceback": traceback.format_exc(limit=8),
        }
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            record["error"]["hint"] = (
                "out of memory: lower hardware.micro_batch_size (the global batch is kept "
                "by gradient accumulation) or set hardware.gradient_checkpointing=true"
            )
        raise
    finally:
        stop.finishing = True
        if record["status"] == "running":  # a second signal landed before the except clause set it
            record["status"] = "canceled" if stop.signal_name else "failed"
        memory.__exit__(None, None, None)
        if t_train is not None:  # interrupted while training
            timers["train_time_s"] += time.perf_counter() - t_train
        try:
            recorder.stop_heartbeat()
            record["cost"].update({**timers, "peak_memory": memory.report()})
            segment_timers = {**timers, "train_time_s": timers["train_time_s"] - restored_train_s}
            close_segment(record, step, time.perf_counter() - t_start, segment_timers)  # wall: all segments
            record["finished_at"] = now()
            recorder.write()
        finally:
            stop.__exit__(None, None, None)
            claim.release()
        if tracker:
            tracker.finish(record["status"] == "completed", record, record_path)
    if is_main:
        final = record["metrics"]["final"][primary]
        print(
            f"[lorabench] {rid}: {primary}={final:.4f} ({cfg.dataset.name}, {record['dataset']['source']['kind']} "
            f"source) in {record['cost']['wall_time_s']:.1f}s; record: {record_path}"
        )
    return record


def _first_nonfinite_grad(model) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


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
