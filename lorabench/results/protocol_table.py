"""Tables of the federated, continual, compose and compressed protocols (``lorabench table --protocol NAME``).

One row per method variant and model (labels as in the single-run table: ``ffa_lora
aggregation=fedsvd``, ``lora dp_target_epsilon=8.0``), each cell the mean ± std over seeds (n):

* federated: the global model's final primary metric, the round it first reached
  ``protocol.federated.target``, megabytes sent per round to and from the clients, epsilon spent;
* continual: the average accuracy over the tasks after the last stage, backward transfer
  (Lopez-Paz & Ranzato 2017: the final score on each earlier task minus its score right after its
  own stage; negative = forgetting), the mean forgetting (best earlier score minus final score),
  and the final score on each task;
* compose: one row per combination (each task's own ``expert``, the ``base`` with the task heads
  only, every merge) and method variant, its score on each task, their average and the merged
  update's stored entries (:func:`build_compose_rows`);
* compressed: the compressor and compensation, stored bits per compressed weight, the model's
  output error against the uncompressed model before and after the compensation, and the final
  primary metric (after fine-tuning, or training-free at ``train.max_steps=0``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from lorabench.results.table import SCALE, Table, _fmt_key, _variant, fmt_stats, lookup, stats, variant_labels

MB = 1e6


def _final(record: dict) -> float | None:
    metrics = record["metrics"]
    chosen = metrics.get("best") if metrics.get("report") == "best" else metrics.get("final")
    return (chosen or {}).get(metrics["primary"])


def _last_round(record: dict) -> dict:
    history = record["protocol_report"]["history"]
    return history[-1] if history else {}


def _per_mb(key: str) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        got = _last_round(record).get(key)
        return None if got is None else got / MB

    return value


# column title -> (value of one record, scale of the cell, whether higher is better or None)
FEDERATED: dict[str, tuple[Callable[[dict], float | None], float, bool | None]] = {
    "final": (_final, SCALE, True),
    "rounds to target": (lambda r: r["protocol_report"].get("rounds_to_target"), 1.0, False),
    "MB down/round": (_per_mb("downlink_bytes"), 1.0, False),
    "MB up/round": (_per_mb("uplink_bytes"), 1.0, False),
    "epsilon": (lambda r: _last_round(r).get("epsilon"), 1.0, None),
}


def _continual_columns(records: list[dict]) -> dict:
    columns = {
        "average": (lambda r: r["protocol_report"].get("average_accuracy"), SCALE, True),
        "BWT": (lambda r: r["protocol_report"].get("backward_transfer"), SCALE, True),
        "forgetting": (lambda r: r["protocol_report"].get("forgetting"), SCALE, False),
    }
    tasks = []
    for r in records:
        tasks += [t for t in r["protocol_report"].get("tasks", []) if t not in tasks]
    for task in tasks:

        def final_on(r, task=task):
            report = r["protocol_report"]
            if task not in report.get("tasks", []):
                return None
            return report["accuracy_matrix"][-1][report["tasks"].index(task)]

        columns[f"{task} final"] = (final_on, SCALE, True)
    return columns


NOTES = {
    "federated": (
        "final: the global model's primary metric x 100 after the last round; rounds to target: the first "
        "round at or above protocol.federated.target (– if never); MB per round summed over the sampled "
        "clients; epsilon: user-level (epsilon, delta) spent, Opacus RDP accountant without sampling "
        "amplification (– without DP). Cells: mean ± std over seeds (n runs)."
    ),
    "compose": (
        "One row per combination of the K experts: expert = each task scored with its own expert; base = no "
        "adapter, the task heads only; then every merge of protocol.compose.merges. <task>: its primary metric "
        "x 100 with the combination and the task's head; average: their mean; stored: entries the merged update "
        "takes (all layers; K x one expert's for the concatenation-sized merges). Cells: mean ± std over seeds "
        "(n runs)."
    ),
    "compressed": (
        "bits/weight: stored bits per weight of the compressed layers (codes, scales, zeros, masks); output "
        "error: relative Frobenius error of the last hidden states against the uncompressed model on the "
        "calibration batches, compressed and then with the compensation in the LoRA; final: the primary metric "
        "x 100 after training (training-free at train.max_steps=0). Cells: mean ± std over seeds (n runs)."
    ),
    "continual": (
        "average: mean primary metric x 100 over the tasks after the last stage; BWT: backward transfer "
        "(final score on each earlier task minus its score after its own stage; negative = forgetting); "
        "forgetting: best earlier score minus final score, averaged over the earlier tasks; <task> final: the "
        "score on that task after the last stage. Cells: mean ± std over seeds (n runs)."
    ),
}


def _report(key: str, *path: str) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        got = record["protocol_report"].get(key)
        for part in path:
            got = None if got is None else got.get(part)
        return got

    return value


COMPRESSED: dict[str, tuple[Callable[[dict], float | None], float, bool | None]] = {
    "bits/weight": (_report("bits_per_weight"), 1.0, False),
    "output error": (_report("output_error", "compressed"), 1.0, None),
    "compensated error": (_report("output_error", "compensated"), 1.0, False),
    "final": (_final, SCALE, True),
}


def build_compose_rows(records: list[dict], group_by: tuple[str, ...] = ()) -> tuple[Table, str]:
    """(the table, its footnote) of compose records: one row per (method variant, model, tasks,
    combination), the combinations in the records' order."""
    labels = variant_labels(records, group_by)
    tasks: list[str] = []
    for r in records:
        tasks += [t for t in r["protocol_report"]["tasks"] if t not in tasks]
    columns = [*tasks, "average", "stored"]
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: (r["method"]["label"], r["model"]["name"])):
        report = r["protocol_report"]
        for name, row in report["rows"].items():
            key = (labels[_variant(r, group_by)], r["model"]["name"], r["dataset"]["name"], name)
            for task, scores in row["scores"].items():
                values[key][task].append(float(scores[report["primary_metrics"][task]]))
            if row.get("average") is not None:
                values[key]["average"].append(float(row["average"]))
            if row.get("stored_params") is not None:
                values[key]["stored"].append(float(row["stored_params"]))
    header = ["method", "model", "tasks", "combination", *columns]
    rows, numbers = [], []
    for key, cells in values.items():
        scale = {c: SCALE for c in [*tasks, "average"]} | {"stored": 1.0}
        rows.append([*key, *(fmt_stats(cells.get(c, []), scale[c]) for c in columns)])
        numbers.append({**dict(zip(header, key)), **{c: stats(cells.get(c, []), scale[c]) for c in columns}})
    return Table(header, rows, set(), [], numbers), NOTES["compose"]


def build_protocol_rows(records: list[dict], protocol: str, group_by: tuple[str, ...] = ()) -> tuple[Table, str]:
    """(the table, its footnote) of one protocol's completed records."""
    if protocol == "compose":
        return build_compose_rows(records, group_by)
    columns = {"federated": FEDERATED, "compressed": COMPRESSED}.get(protocol) or _continual_columns(records)
    labels = variant_labels(records, group_by)
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: (r["method"]["label"], r["model"]["name"])):
        row = (
            labels[_variant(r, group_by)],
            r["model"]["name"],
            r["dataset"]["name"],
            *(_fmt_key(lookup(r, k)) for k in group_by),
        )
        for title, (value_of, _, _) in columns.items():
            value = value_of(r)
            if value is not None:
                values[row][title].append(float(value))
    header = ["method", "model", "dataset", *group_by, *columns]
    rows, numbers = [], []
    for row, cells in values.items():
        rows.append([*row, *(fmt_stats(cells.get(t, []), scale) for t, (_, scale, _) in columns.items())])
        numbers.append(
            {
                **dict(zip(header, row)),
                **{t: stats(cells.get(t, []), scale) for t, (_, scale, _) in columns.items()},
            }
        )
    best = set()
    first = len(header) - len(columns)
    for j, (title, (_, _, higher)) in enumerate(columns.items()):
        means = [n[title]["mean"] for n in numbers]
        present = [m for m in means if m is not None]
        if higher is None or not present:
            continue
        target = max(present) if higher else min(present)
        best |= {(i, first + j) for i, m in enumerate(means) if m == target}
    return Table(header, rows, best, [], numbers), NOTES[protocol]
