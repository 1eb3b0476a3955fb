"""The compose protocol's run body: one LoRA expert per task of ``protocol.compose.tasks``, then the
experts combined by every merge of ``protocol.compose.merges`` and each combination scored on every
task.

Design (each rule with its reason):

* the experts are trained in one process on one model, one after another, with the continual
  protocol's stage pieces (lorabench.protocols.continual.protocol: the first task's model and
  method, ``steps_per_task`` steps per stage, a fresh optimizer state, LR schedule and seed per
  stage), except that every stage starts from the adapter's *initial* factors: the experts are
  independent, as K single runs with the run's seed would be, and they share one initialisation,
  as the merging papers' experts share their pre-trained start (TIES, DARE and LoRA-LEGO merge
  task vectors relative to one base).
* heads: a classification task has its own head (lorabench.protocols.continual.heads), trained only
  with its expert; every combination is scored on a task through that task's head (the task is
  known at test time, as in the merging papers' per-task classifiers). Causal-LM tasks share the LM head.
* a merge works layer by layer on the experts' task vectors ΔW_k = s B_k A_k
  (lorabench.protocols.compose.merges); its result is added to the frozen base weights for the
  evaluation (the run's adapter contributes nothing meanwhile) and removed after.
* rows: ``expert`` (each task scored with its own expert: the reference a merge is measured
  against), ``base`` (no adapter, the trained task heads only: what the adapters add), then every merge.
* resume: none inside the run; ``resume=auto`` reruns an interrupted compose run from its start
  (its experts are minutes of training at the sizes it is meant for).

The record: ``protocol_report`` {name, version, tasks, steps_per_task, merges, settings, rows
{row: {scores {task: {metric: value}}, average, stored_params, merge_time_s}}, expert_params};
``metrics`` with primary ``average_score`` (the first merge's mean primary metric over the tasks)
and final {"<row>/average", "<row>/<task>"}; ``history`` one entry per expert.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from lorabench.protocols.compose.merges import MERGES, MergeInput, stored_params
from lorabench.protocols.continual.batches import derived_seed
from lorabench.protocols.continual.protocol import (
    ContinualRun,
    Task,
    build_continual_run,
    load_tasks,
    progress_bar,
    start_stage,
    train_stage,
)
from lorabench.protocols.continual.strategies import STRATEGIES
from lorabench.train import _evaluate, finish_record, record_training_cost

PROTOCOL_VERSION = "1"  # bump when the expert or merge rules or the summary figures change
ADAPTER = "default"  # the peft adapter the run's method builds


def train_compose(session) -> None:
    """The compose protocol (see the module docstring), inside lorabench.train.run_with_record."""
    state, stop = session.state, session.stop
    tasks = load_tasks(session.cfg)
    cr = build_continual_run(session, tasks, STRATEGIES.get("sequential")(session.cfg.protocol.compose))
    cr.run.record["metrics"].update(primary="average_score", higher_is_better=True, report="last")
    bind_record(cr, state)
    layers = lora_layers(cr.run.model)
    initial = snapshot(layers)
    cr.run.model.train()
    cr.run.bar = progress_bar(cr, state)
    experts, rows = {}, {}
    for t in tasks:
        load_factors(layers, initial)
        start_stage(cr, t, state)
        train_stage(cr, t, state, stop)
        experts[t.name] = snapshot(layers)
        rows.setdefault("expert", {"scores": {}})["scores"][t.name] = score_task(cr, t, state)
        state.history.append({"step": state.step, "expert": t.name, "metrics": rows["expert"]["scores"][t.name]})
        report(cr, rows, layers, experts)
    cr.run.bar.close()
    rows["base"] = score_combination(cr, state, layers, {})
    for name in cr.settings.merges:
        t0 = time.perf_counter()
        deltas, sizes = merged_deltas(layers, experts, name, cr.settings, cr.run_cfg.seed)
        rows[name] = score_combination(cr, state, layers, deltas)
        rows[name].update(stored_params=sum(sizes.values()), merge_time_s=time.perf_counter() - t0)
        report(cr, rows, layers, experts)
    if cr.selector is not None:
        cr.selector.active, cr.selector.task_ids = 0, None
    load_factors(layers, experts[tasks[0].name])  # the saved adapter is the first task's expert
    record_training_cost(cr.run, state)
    finish_record(cr.run)


def bind_record(cr: ContinualRun, state) -> None:
    """The state's lists bound into the record (as the continual protocol's resume does)."""
    record = cr.run.record
    record.update(history=state.history, train_log=state.train_log, samples=state.samples)
    record["method_report"]["skipped_nonfinite_steps"] = state.skipped
    cr.run.recorder.step = state.step


# -- the adapter's factors ------------------------------------------------------------------------
def lora_layers(model) -> dict:
    """The model's peft LoRA layers by module name (lorabench.protocols.compose.check admits only
    methods whose adapter is peft's LoRA)."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
    if not layers:
        raise RuntimeError("protocol=compose found no peft LoRA layer in the model")
    return layers


def snapshot(layers: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (B, A) as float32 copies."""
    return {
        name: (m.lora_B[ADAPTER].weight.detach().float().clone(), m.lora_A[ADAPTER].weight.detach().float().clone())
        for name, m in layers.items()
    }


def load_factors(layers: dict, factors: dict) -> None:
    with torch.no_grad():
        for name, m in layers.items():
            b, a = factors[name]
            m.lora_B[ADAPTER].weight.copy_(b)
            m.lora_A[ADAPTER].weight.copy_(a)


def expert_factors(layer, experts: dict, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K experts' (s B_k, A_k) of layer ``name`` (s the layer's LoRA scaling)."""
    s = float(layer.scaling[ADAPTER])
    return [(b * s, a) for b, a in (experts[task][name] for task in experts)]


def merged_deltas(layers: dict, experts: dict, merge: str, settings, seed: int) -> tuple[dict, dict]:
    """Merge ``merge``'s ΔW for every layer (in the base weight's orientation) and its stored size."""
    rule = MERGES.get(merge, where="protocol.compose.merges entry")
    deltas, sizes = {}, {}
    for index, (name, layer) in enumerate(layers.items()):
        factors = expert_factors(layer, experts, name)
        inp = MergeInput(
            deltas=[b @ a for b, a in factors],
            factors=factors,
            settings=settings,
            seed=derived_seed(seed, f"merge/{merge}", index),
        )
        merged = rule.fn(inp)
        sizes[name] = stored_params(rule, merged, factors, settings)
        deltas[name] = merged.T if layer.fan_in_fan_out else merged
    return deltas, sizes


@contextlib.contextmanager
def applied(layers: dict, deltas: dict):
    """The base weights plus ``deltas`` and the run's adapter silenced (its B zeroed), restored after."""
    kept = {}
    with torch.no_grad():
        for name, m in layers.items():
            base, b = m.get_base_layer().weight, m.lora_B[ADAPTER].weight
            kept[name] = (base.detach().clone(), b.detach().clone())
            b.zero_()
            if name in deltas:
                base.add_(deltas[name].to(base.device, base.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, m in layers.items():
                m.get_base_layer().weight.copy_(kept[name][0])
                m.lora_B[ADAPTER].weight.copy_(kept[name][1])


# -- scores ---------------------------------------------------------------------------------------
def score_task(cr: ContinualRun, t: Task, state) -> dict:
    """Task ``t``'s scores ({metric: value}) with the model as it is, through ``t``'s head."""
    run = cr.run
    if cr.selector is not None:
        cr.selector.active, cr.selector.task_ids = t.index, None
    t0 = time.perf_counter()
    task_cfg = dataclasses.replace(cr.run_cfg, dataset=t.cfg)
    scores, _ = _evaluate(t.task, run.model, run.parts.tokenizer, t.splits.eval, task_cfg, run.accelerator)
    state.timers.eval_time_s += time.perf_counter() - t0
    if scores.get("missing"):
        run.record["metrics"]["missing"] = scores["missing"]
    return {k: v for k, v in scores.items() if k != "missing"}


def score_combination(cr: ContinualRun, state, layers: dict, deltas: dict) -> dict:
    """Every task's scores with ``deltas`` added to the base weights (none: the base model)."""
    with applied(layers, deltas):
        scores = {t.name: score_task(cr, t, state) for t in cr.tasks}
    return {"scores": scores}


def average(row: dict, tasks: list[Task]) -> float | None:
    """The row's mean primary metric over the tasks it has scores for (None without any)."""
    values = [row["scores"][t.name][t.primary] for t in tasks if t.name in row["scores"]]
    return sum(values) / len(values) if values else None


def report(cr: ContinualRun, rows: dict, layers: dict, experts: dict) -> None:
    """``protocol_report`` and ``metrics.final`` from the rows so far; the record is written."""
    run, tasks, settings = cr.run, cr.tasks, cr.settings
    for row in rows.values():
        row["average"] = average(row, tasks)
    expert_params = sum(b.numel() + a.numel() for b, a in next(iter(experts.values())).values()) if experts else 0
    run.record["protocol_report"] = {
        "name": "compose",
        "version": PROTOCOL_VERSION,
        "tasks": [t.name for t in tasks],
        "primary_metrics": {t.name: t.primary for t in tasks},
        "steps_per_task": settings.steps_per_task,
        "merges": list(settings.merges),
        "settings": {"weight": settings.weight, "density": settings.density, "lego_rank": settings.lego_rank},
        "experts": list(experts),
        "expert_params": expert_params,  # one expert's LoRA entries (all K: K times this)
        "layers": len(layers),
        "rows": rows,
    }
    primaries = {t.name: t.primary for t in tasks}
    final = {f"{row}/average": values["average"] for row, values in rows.items()}
    for row, values in rows.items():
        for task, scores in values["scores"].items():
            final[f"{row}/{task}"] = scores[primaries[task]]
    first = settings.merges[0]
    final["average_score"] = rows[first]["average"] if first in rows else None
    run.record["metrics"].update(final=final, best=None)
    run.recorder.write()
