"""The continual protocol's run body: tasks ``protocol.continual.tasks`` in order, each trained
``steps_per_task`` optimizer steps, then every task seen so far evaluated.

Design (each rule with its reason):

* one model and method for the whole sequence: the first task's build_run_parts/prepare_run
  (lorabench.train), with ``train.max_steps`` replaced by ``steps_per_task x tasks`` (what method
  schedules and procedures see; ``train.max_steps``, ``train.eval_every``, ``train.report`` and
  ``checkpoint.every`` of the config are not used). An initialiser that reads data calibrates on the
  first task.
* heads: classification tasks get one head per task, the adapter shared (task-incremental;
  lorabench.protocols.continual.heads says why); causal-LM tasks share the model's LM head.
* every stage starts with a fresh optimizer state (the state of right after the method was
  applied) and a fresh LR schedule over ``steps_per_task`` steps (``train.schedule``,
  ``train.warmup_ratio``): the standard sequential fine-tuning baseline re-creates its optimizer per
  task, moments of the previous task's loss would otherwise steer the first steps of the next, and
  a stage then depends only on the weights it starts from, which is what makes stage checkpoints
  small and exact. The random stream of stage ``k`` is seeded with ``derived_seed(seed, "stage",
  k)`` (batch order, replay draws, dropout) for the same reason.
* a stage's batches: lorabench.protocols.continual.batches (the strategy's replay mixed in).
* after stage ``i``, tasks ``0..i`` are evaluated with the strategy's evaluation weights (I-LoRA:
  the slow ones), each with its own head, on its evaluation split at the run's sizes.
* resume: a stage checkpoint after every stage (lorabench.protocols.continual.state); with
  ``resume=auto`` an interrupted run continues at the stage after the newest one, and a run stopped
  inside a stage restarts that stage: stage-boundary granularity. A stop signal is honoured between
  steps; at a stage's end the stage is evaluated and saved before the run stops.

The body, top to bottom: :func:`train_continual` over :func:`load_tasks`, :func:`build_continual_run`
and :func:`resume_stages`, then for every stage :func:`start_stage`, :func:`train_stage` and
:func:`close_stage`; :class:`ContinualRun` holds what the pieces share.

The record: ``protocol_report`` {name, tasks, strategy, stages [{task, step, scores}],
accuracy_matrix, average_accuracy, backward_transfer, forgetting, ...}; ``metrics`` with primary
``average_accuracy`` (higher is better) and final {average_accuracy, backward_transfer,
forgetting, "<task>/<metric>" of the last stage}; ``history`` one entry per stage; ``dataset``
every task's source.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import time
from typing import Any

from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from lorabench.config import DatasetConfig, RunConfig
from lorabench.data.base import resolve_primary
from lorabench.protocols.continual import metrics
from lorabench.protocols.continual.batches import StageBatches, derived_seed, replay_indices
from lorabench.protocols.continual.heads import install_task_heads
from lorabench.protocols.continual.state import load_weights, newest_stage, save_stage
from lorabench.protocols.continual.strategies import STRATEGIES
from lorabench.protocols.continual.tasks import task_config, task_settings
from lorabench.registry import DATASETS
from lorabench.results.record import now
from lorabench.train import (
    Run,
    RunCanceled,
    _evaluate,
    _fault_injection_step,
    build_run_parts,
    finish_record,
    prepare_run,
    record_training_cost,
    train_steps,
    training_batches,
)

PROTOCOL_VERSION = "1"  # bump when the stage rules or the summary figures change
HEAD_PROTOCOLS = {
    "classification": "task-incremental: one classification head per task, the rest shared",
    "causal_lm": "one shared language-model head",
}


@dataclasses.dataclass
class Task:
    """One task of the sequence: its dataset, config, primary metric, data and (once needed) features."""

    index: int
    name: str
    task: Any
    cfg: DatasetConfig
    primary: str
    splits: Any = None
    features: list | None = None
    collate_fn: Any = None


class StageProcedure:
    """What the loop calls as the procedure: the method's own (or none) and the strategy's hooks.
    A procedure's post-training evaluations (DyLoRA's rank curve) are not run: they score one task."""

    def __init__(self, inner, strategy):
        self.inner, self.strategy = inner, strategy
        self.moves_trainable_set = bool(getattr(inner, "moves_trainable_set", False))
        self.stage_start = 0

    def extra_loss(self, model):
        terms = [self.inner.extra_loss(model) if self.inner else None, self.strategy.extra_loss(model)]
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_backward(self, step: int) -> None:
        if self.inner:
            self.inner.after_backward(step)

    def on_step_end(self, step: int) -> None:
        if self.inner:
            self.inner.on_step_end(step)
        self.strategy.on_step_end(step - self.stage_start)

    def state(self) -> dict:
        return self.inner.state() if self.inner else {}

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner:
            self.inner.load_state_dict(state)


@dataclasses.dataclass
class ContinualRun:
    """What the stages share: the prepared run (its procedure a StageProcedure), the tasks, the
    strategy, the task-head selector (None for a shared LM head), the optimizer's state of right
    after the method was applied, the run's config (``train.max_steps`` = ``steps_per_task x
    tasks``), the stages done, the replay buffer's indices per task and the fault-injection step."""

    run: Run
    tasks: list[Task]
    strategy: Any
    selector: Any
    fresh: dict
    run_cfg: RunConfig
    stages: list[dict] = dataclasses.field(default_factory=list)
    replay: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    fault_step: int | None = None

    @property
    def settings(self):
        return task_settings(self.run_cfg)

    def stage_bounds(self, t: Task) -> tuple[int, int]:
        """The steps stage ``t`` starts and ends at."""
        steps = self.settings.steps_per_task
        return t.index * steps, (t.index + 1) * steps


def train_continual(session) -> None:
    """The continual protocol (see the module docstring), inside lorabench.train.run_with_record:
    the pieces top to bottom."""
    state, stop, settings = session.state, session.stop, session.cfg.protocol.continual
    tasks = load_tasks(session.cfg)
    strategy = STRATEGIES.get(settings.strategy, where="protocol.continual.strategy")(settings)
    cr = build_continual_run(session, tasks, strategy)
    start = resume_stages(cr, state)
    report(cr)

    cr.fault_step = _fault_injection_step()
    cr.run.model.train()
    cr.run.bar = progress_bar(cr, state)
    for t in tasks[start:]:
        start_stage(cr, t, state)
        train_stage(cr, t, state, stop)
        close_stage(cr, t, state, stop)
    finish_continual(cr, state)


# -- the run's pieces -------------------------------------------------------------------------------
def load_tasks(cfg) -> list[Task]:
    """The run's tasks (``protocol.continual.tasks``, or compose's), each with its config and primary metric."""
    tasks, where = [], f"protocol.{cfg.protocol.name}.tasks entry"
    for index, name in enumerate(task_settings(cfg).tasks):
        task, task_cfg = DATASETS.get(name, where=where), task_config(cfg, name)
        tasks.append(Task(index, name, task, task_cfg, resolve_primary(task, task_cfg)))
    return tasks


def build_continual_run(session, tasks: list[Task], strategy) -> ContinualRun:
    """Every task's data, then the first task's model and method (build_run_parts), every task's
    features, the task heads, the prepared run with the strategy's procedure and setup."""
    cfg, accelerator, record, state = session.cfg, session.accelerator, session.record, session.state
    total = task_settings(cfg).steps_per_task * len(tasks)
    run_cfg = dataclasses.replace(cfg, dataset=tasks[0].cfg, train=dataclasses.replace(cfg.train, max_steps=total))
    record["metrics"].update(primary="average_accuracy", higher_is_better=True, report="last")
    record["progress"]["max_steps"] = total
    for t in tasks[1:]:  # every task's data before the model loads: a bad file stops the run here
        t.splits = t.task.load(t.cfg)
    parts = build_run_parts(run_cfg, session.spec, tasks[0].task, accelerator, record)
    tasks[0].splits = parts.splits
    record["dataset"] = describe_tasks(tasks)
    for t in tasks:  # every task's features before training: a prompt longer than max_length stops the run here
        stage_features(run_cfg, t, parts.tokenizer, accelerator)
    head = tasks[0].task.head
    selector = install_task_heads(parts.model, len(tasks)) if head == "classification" else None
    run = prepare_run(parts, accelerator, session.recorder, session.tracker, session.stop, state.timers)
    run.procedure = StageProcedure(run.procedure, strategy)
    strategy.setup(run, selector)
    fresh = copy.deepcopy(run.optimizer.state_dict())
    return ContinualRun(run, tasks, strategy, selector, fresh, run_cfg)


def progress_bar(cr: ContinualRun, state) -> tqdm:
    """The run's progress bar over all stages' steps, from the state's step."""
    return tqdm(
        total=cr.run_cfg.train.max_steps,
        initial=state.step,
        disable=not (cr.run.accelerator.is_main_process and cr.run_cfg.progress),
        desc=f"{cr.run.parts.spec.label} continual",
        unit="step",
    )


def start_stage(cr: ContinualRun, t: Task, state) -> None:
    """Stage ``t``'s start: a fresh optimizer state and LR schedule, the stage's seed, its batches
    (the replay pool mixed in) and its task head active."""
    run, stage_start = cr.run, cr.stage_bounds(t)[0]
    if state.step != stage_start:
        raise RuntimeError(f"stage {t.index} should start at step {stage_start}, the run is at {state.step}")
    seed = derived_seed(cr.run_cfg.seed, "stage", t.index)
    fresh_optimizer(run, cr.fresh, cr.settings.steps_per_task)
    set_seed(seed)
    pool = replay_pool(cr, t)
    run.batches = stage_batches(cr, t, seed, pool)
    if cr.selector is not None:
        cr.selector.active, cr.selector.task_ids = t.index, None
    run.procedure.stage_start = stage_start
    if run.accelerator.is_main_process:
        run.bar.write(
            f"[lorabench] stage {t.index + 1}/{len(cr.tasks)}: {t.name} "
            f"({len(t.features)} examples, replay pool {len(pool)})"
        )


def replay_pool(cr: ContinualRun, t: Task) -> list[tuple[int, Any]]:
    """The replay buffer's (task index, feature) pairs of the tasks before ``t``; none without replay."""
    pool = []
    for u in cr.tasks[: t.index] if cr.strategy.replays else []:
        pool.extend((u.index, u.features[k]) for k in cr.replay[u.name])
    return pool


def stage_batches(cr: ContinualRun, t: Task, seed: int, pool: list) -> StageBatches:
    """Stage ``t``'s endless training micro-batches, ``pool`` mixed in at ``replay_ratio``."""
    accelerator = cr.run.accelerator
    return StageBatches(
        t.features,
        t.index,
        t.collate_fn,
        micro=cr.run_cfg.hardware.micro_batch_size,
        seed=seed,
        device=accelerator.device,
        replay=pool,
        ratio=getattr(cr.settings, "replay_ratio", 0.0),  # compose's settings have no replay
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        on_batch=Router(cr.selector, cr.strategy),
    )


def train_stage(cr: ContinualRun, t: Task, state, stop) -> None:
    """Stage ``t``'s optimizer steps, until its last or a stop signal (then the run is canceled: a
    stage's checkpoint is written only at its end)."""
    stage_end = cr.stage_bounds(t)[1]
    state.timers.start()
    stop.in_loop = True
    while state.step < stage_end and not stop.signal_name:
        train_steps(cr.run, state, 1)
        if state.step == cr.fault_step:
            os.kill(os.getpid(), signal.SIGTERM)
    state.timers.stop()
    stop.in_loop = False
    if state.step < stage_end:
        raise RunCanceled(
            f"received {stop.signal_name} at step {state.step}, inside stage {t.index} ({t.name}); "
            f"resume=auto restarts that stage from its start (checkpoints are at stage boundaries)"
        )


def close_stage(cr: ContinualRun, t: Task, state, stop) -> None:
    """Stage ``t``'s end: every task seen so far evaluated, the task's replay indices drawn, the stage
    recorded and checkpointed; a stop signal cancels the run now."""
    scores = evaluate_seen(cr, state, cr.tasks[: t.index + 1])
    if cr.strategy.replays:
        seed = derived_seed(cr.run_cfg.seed, "replay", t.index)
        cr.replay[t.name] = replay_indices(len(t.splits.train), cr.settings.replay_size, seed)
    cr.stages.append({"task": t.name, "step": state.step, "scores": scores})
    record_stage(cr, t, state, scores)
    stop.in_loop = True  # a signal now lets the stage's checkpoint finish
    checkpoint_stage(cr, t, state)
    stop.in_loop = False
    cr.run.recorder.write()
    if stop.signal_name:
        raise RunCanceled(
            f"received {stop.signal_name} after stage {t.index} ({t.name}); "
            f"resume=auto continues at stage {t.index + 1}"
        )


def record_stage(cr: ContinualRun, t: Task, state, scores: dict) -> None:
    """Stage ``t``'s entry of the history, the report and the tracker: the mean over the accuracy
    matrix's newest row and every seen task's scores."""
    names = [u.name for u in cr.tasks]
    row_mean = metrics.average_accuracy(metrics.accuracy_matrix(cr.stages, names, primaries(cr.tasks)))
    flat = {f"{task}/{k}": v for task, values in scores.items() for k, v in values.items()}
    state.history.append(
        {"step": state.step, "stage": t.index, "task": t.name, "metrics": {"average_accuracy": row_mean, **flat}}
    )
    report(cr)
    if cr.run.tracker:
        cr.run.tracker.log(
            {f"eval/{k}": v for k, v in {"average_accuracy": row_mean, **flat}.items() if v is not None},
            step=state.step,
        )


def checkpoint_stage(cr: ContinualRun, t: Task, state) -> None:
    """Stage ``t``'s checkpoint (lorabench.protocols.continual.state): the weights, the strategy's
    and the procedure's state, the stages, the replay indices and the training state."""
    run = cr.run
    save_stage(
        run.run_dir,
        t.index,
        model=run.model,
        strategy=cr.strategy,
        procedure=run.procedure,
        state={
            "stages": cr.stages,
            "replay": cr.replay,
            "train": {**state.state_dict(), "step": state.step},
            "strategy": cr.strategy.state_dict(),
        },
        accelerator=run.accelerator,
        keep=cr.run_cfg.checkpoint.keep,
    )


def finish_continual(cr: ContinualRun, state) -> None:
    """After the last stage: the strategy's finish, the first head active, the costs and the record."""
    cr.run.bar.close()
    cr.strategy.finish(cr.run)
    if cr.selector is not None:
        cr.selector.active, cr.selector.task_ids = 0, None
    record_training_cost(cr.run, state)
    finish_record(cr.run)


# -- pieces ---------------------------------------------------------------------------------------
def primaries(tasks: list[Task]) -> dict[str, str]:
    return {t.name: t.primary for t in tasks}


def describe_tasks(tasks: list[Task]) -> dict:
    """The record's ``dataset``: the sequence's name and every task's source and splits."""
    entries = []
    for t in tasks:
        s = t.splits
        entries.append(
            {
                "name": t.name,
                "version": t.task.version,
                "source": s.source,
                "train_split": s.train_split,
                "eval_split": s.eval_split,
                "train_size": len(s.train),
                "eval_size": len(s.eval),
                "protocol": t.task.protocol(t.cfg),
                "notes": s.notes,
            }
        )
    kinds = sorted({e["source"].get("kind") for e in entries})
    where = "; ".join(
        f"{e['name']}={e['source'].get('path') or e['source'].get('hub_id') or e['source'].get('kind')}"
        for e in entries
    )
    return {
        "name": "+".join(t.name for t in tasks),
        "version": f"{PROTOCOL_VERSION}({'+'.join(str(t.task.version) for t in tasks)})",
        "source": {"kind": kinds[0] if len(kinds) == 1 else "mixed", "path": where},
        "tasks": entries,
        "protocol": {"kind": "continual", "heads": HEAD_PROTOCOLS[tasks[0].task.head]},
        "eval_schedule": {"after_each_stage": "every task seen so far"},
    }


def stage_features(run_cfg, t: Task, tokenizer, accelerator) -> None:
    """Task ``t``'s training features (cached) and collate function (lorabench.train.training_batches,
    which also refuses a split smaller than one micro-batch)."""
    task_cfg = dataclasses.replace(run_cfg, dataset=t.cfg)
    t.features, loader = training_batches(task_cfg, t.task, t.splits.train, tokenizer, accelerator)
    t.collate_fn = loader.collate_fn


def fresh_optimizer(run, fresh: dict, steps: int) -> None:
    """The optimizer's state of right after the method was applied, and a new LR schedule over
    ``steps`` steps. An optimizer whose parameter groups changed since (IncreLoRA adds groups) has its
    state cleared and its groups' learning rates reset instead."""
    cfg, accelerator = run.cfg, run.accelerator
    inner = getattr(run.optimizer, "optimizer", run.optimizer)
    try:
        run.optimizer.load_state_dict(copy.deepcopy(fresh))
    except (ValueError, KeyError, RuntimeError):
        inner.state.clear()
        for group in inner.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
    warmup = math.ceil(cfg.train.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.train.schedule, inner, num_warmup_steps=warmup, num_training_steps=steps)
    run.scheduler = accelerator.prepare_scheduler(scheduler)


@dataclasses.dataclass
class Router:
    """Every training micro-batch (StageBatches' ``on_batch``): its rows routed to their task heads,
    then shown to the strategy."""

    selector: Any
    strategy: Any

    def __call__(self, batch: dict, task_ids, replay_rows: list[int]) -> None:
        if self.selector is not None:
            self.selector.task_ids = task_ids if replay_rows else None
        self.strategy.on_batch(batch, task_ids, replay_rows)


def evaluate_seen(cr: ContinualRun, state, seen: list[Task]) -> dict:
    """Scores of every task in ``seen`` ({task: {metric: value}}) with the strategy's weights."""
    run, selector = cr.run, cr.selector
    accelerator, tokenizer, record = run.accelerator, run.parts.tokenizer, run.record
    t0 = time.perf_counter()
    out = {}
    with cr.strategy.evaluation_weights(run):
        for u in seen:
            if selector is not None:
                selector.active, selector.task_ids = u.index, None
            task_cfg = dataclasses.replace(cr.run_cfg, dataset=u.cfg)
            scores, _ = _evaluate(u.task, run.model, tokenizer, u.splits.eval, task_cfg, accelerator)
            if scores.get("missing"):
                record["metrics"]["missing"] = scores["missing"]
            out[u.name] = {k: v for k, v in scores.items() if k != "missing"}
    if selector is not None:
        selector.active = seen[-1].index
    state.timers.eval_time_s += time.perf_counter() - t0
    if accelerator.is_main_process:
        row = ", ".join(f"{name}={values[u.primary]:.4f}" for u, (name, values) in zip(seen, out.items()))
        print(f"[lorabench] after stage {len(seen)} ({seen[-1].name}) @ step {state.step}: {row}")
    return out


def report(cr: ContinualRun) -> None:
    """``protocol_report`` and ``metrics.final`` from the stages so far; the record is written."""
    run, tasks, stages = cr.run, cr.tasks, cr.stages
    settings, record = run.cfg.protocol.continual, run.record
    names = [t.name for t in tasks]
    summary = metrics.summary(stages, names, primaries(tasks))
    record["protocol_report"] = {
        "name": "continual",
        "version": PROTOCOL_VERSION,
        "tasks": names,
        "strategy": settings.strategy,
        "strategy_report": cr.strategy.report(),
        "steps_per_task": settings.steps_per_task,
        "primary_metrics": primaries(tasks),
        "heads": HEAD_PROTOCOLS[tasks[0].task.head],
        "optimizer": "fresh state and LR schedule every stage",
        "stages": stages,
        **summary,
        "replay_buffer": {task: len(indices) for task, indices in cr.replay.items()},
    }
    final = None
    if stages:
        final = {k: summary[k] for k in ("average_accuracy", "backward_transfer", "forgetting")}
        final.update({f"{task}/{k}": v for task, values in stages[-1]["scores"].items() for k, v in values.items()})
    record["metrics"].update(final=final, best=None)
    run.recorder.write()


def resume_stages(cr: ContinualRun, state) -> int:
    """With ``resume=auto``, the newest stage checkpoint restored (:func:`restore_stage`); the state's
    lists bound into the record. Returns the index of the stage to train next (0 without a checkpoint)."""
    run, record = cr.run, cr.run.record
    checkpoint, skipped = (None, [])
    if run.cfg.resume == "auto":
        checkpoint, skipped = newest_stage(run.run_dir, warn=run.accelerator.is_main_process)
    start = restore_stage(cr, state, checkpoint, skipped) if checkpoint else 0
    record.update(history=state.history, train_log=state.train_log, samples=state.samples)
    record["method_report"]["skipped_nonfinite_steps"] = state.skipped
    run.recorder.step = state.step
    return start


def restore_stage(cr: ContinualRun, state, checkpoint, skipped: list) -> int:
    """A stage checkpoint into the model, the strategy, the procedure, ``state``, the stages and the
    replay indices, and its entry in the record's ``resumed_from``. Returns the next stage's index."""
    run, strategy, accelerator, record = cr.run, cr.strategy, cr.run.accelerator, cr.run.record
    saved = checkpoint.state
    load_weights(checkpoint, run.model, accelerator)
    strategy.load_tensors(checkpoint.strategy, accelerator.device)
    strategy.load_state_dict(saved.get("strategy") or {})
    if checkpoint.procedure is not None:
        run.procedure.load_state_dict(checkpoint.procedure)
    state.load_state_dict(saved["train"])
    cr.stages.extend(saved["stages"])
    cr.replay.update(saved["replay"])
    record["resumed_from"].append(
        {
            "step": state.step,
            "stage": saved["stage"],
            "checkpoint": str(checkpoint.path),
            "verified": checkpoint.verified,
            "at": now(),
            "skipped": skipped,
        }
    )
    if accelerator.is_main_process:
        print(
            f"[lorabench] resuming {record['run_id']} after stage {saved['stage']} "
            f"(step {state.step}; {checkpoint.path})"
        )
    return saved["stage"] + 1
