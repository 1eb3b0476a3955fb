"""``lorabench table``: records -> one comparison table.

Rows are method variants (method label x model; a label run with different settings gets a short
config hash). Each dataset column holds the reported primary metric (last or best evaluation, as
the run's ``train.report`` says) as mean ± std over seeds with n. Records are only averaged when
they share the dataset name, version and source: a dataset read from two sources gives two
columns. Cost columns are the mean over the row's completed records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

from lorabench.results.record import iter_records

FORMATS = ("md", "csv", "latex")
COST_COLUMNS = (
    ("trainable params", lambda r: r["cost"].get("trainable_params"), "{:,.0f}"),
    ("peak mem MB", lambda r: _peak_mb(r), "{:,.0f}"),
    ("opt-state MB", lambda r: _mb(r["cost"].get("optimizer_state_bytes")), "{:,.2f}"),
    ("tokens/s", lambda r: r["cost"].get("tokens_per_s"), "{:,.0f}"),
)


def _mb(value):
    return None if value is None else value / 2**20


def _peak_mb(record: dict):
    peak = record["cost"].get("peak_memory") or {}
    return _mb(peak.get("cuda_allocated_bytes") or peak.get("cpu_peak_rss_bytes"))


def source_key(record: dict) -> str:
    """Identity of where the data came from; records with different keys are never averaged."""
    src = record["dataset"].get("source") or {}
    where = src.get("hub_id") or src.get("path") or src.get("generator") or ""
    return f"{src.get('kind')}:{where}"


def _variant(record: dict) -> str:
    cfg = {k: v for k, v in record["config"].items() if k not in ("seed", "dataset", "results_dir", "force",
                                                                   "progress", "tracker", "hardware")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:6]


def reported_value(record: dict) -> float | None:
    metrics = record["metrics"]
    chosen = metrics.get("best") if metrics.get("report") == "best" else metrics.get("final")
    return None if not chosen else chosen.get(metrics["primary"])


def fmt_stats(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f} (n={len(values)})"


def collect(root: Path, methods=None, models=None, datasets=None):
    records, problems, excluded = [], [], defaultdict(int)
    for path, record, problem in iter_records(root):
        if problem:
            problems.append((path, problem))
            continue
        if methods and record["method"]["label"] not in methods:
            continue
        if models and record["model"]["name"] not in models:
            continue
        if datasets and record["dataset"]["name"] not in datasets:
            continue
        if record["status"] != "completed":
            excluded[record["status"]] += 1
            continue
        records.append(record)
    return records, problems, excluded


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    labels_variants = defaultdict(set)
    for r in records:
        labels_variants[(r["method"]["label"], r["model"]["name"])].add(_variant(r))
    columns: dict[tuple, str] = {}
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    row_records: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r["method"]["label"], r["model"]["name"])):
        label, model = r["method"]["label"], r["model"]["name"]
        row = (label if len(labels_variants[(label, model)]) == 1 else f"{label} [{_variant(r)}]", model)
        col = (r["dataset"]["name"], r["dataset"]["version"], source_key(r), r["metrics"]["primary"])
        columns[col] = None
        value = reported_value(r)
        if value is not None:
            cells[row][col].append(value)
        row_records[row].append(r)
    multi_source = defaultdict(set)
    for name, _, src, _ in columns:
        multi_source[name].add(src)
    col_names = []
    for name, version, src, metric in columns:
        suffix = f" @{src.split(':')[0]}" if len(multi_source[name]) > 1 or src.startswith("generated") else ""
        col_names.append(f"{name}{suffix} v{version} {metric}")
    header = ["method", "model", *col_names, *(c[0] for c in COST_COLUMNS)]
    rows = []
    for row, recs in row_records.items():
        metric_cells = [fmt_stats(cells[row].get(col, [])) for col in columns]
        cost_cells = []
        for _, getter, pattern in COST_COLUMNS:
            values = [v for v in (getter(r) for r in recs) if v is not None]
            cost_cells.append(pattern.format(statistics.fmean(values)) if values else "–")
        rows.append([row[0], row[1], *metric_cells, *cost_cells])
    return header, rows


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "latex":
        def esc(s: str) -> str:
            return s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("&", r"\&")

        lines = [r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", r"\toprule",
                 " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in row) + r" \\" for row in rows]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_table(root: Path, fmt: str = "md", methods=None, models=None, datasets=None) -> tuple[str, list]:
    """The rendered table and the list of (path, problem) for unreadable or invalid records."""
    records, problems, excluded = collect(root, methods, models, datasets)
    if not records:
        return f"no completed records under {root}", problems
    header, rows = table_rows(records)
    text = render(header, rows, fmt)
    if fmt == "md":
        text += "\n\nMetric cells: reported primary metric x 100, mean ± std over seeds (n runs)."
        if excluded:
            text += " Not shown: " + ", ".join(f"{n} {status}" for status, n in sorted(excluded.items())) + " runs."
    return text, problems
