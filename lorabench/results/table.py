"""``lorabench table``: records -> one comparison table.

Rows are method variants (method label x model, plus any ``--group-by`` config keys; a label run
with different settings is labelled by the values that differ, e.g. ``lora rank=16``). Each
dataset column holds the reported primary
metric (last or best evaluation, as the run's ``train.report`` says) as mean ± std over seeds with
n. Records are only averaged when they share the dataset name, version and source: a dataset read
from two sources gives two columns. Cost columns are the mean over the row's completed records.

The best value of every metric and cost column is marked (bold in md/html/latex) when at least two
rows have a value; ties are all marked. ``csv`` and ``json`` hold numbers only: mean, std and n per
metric column, plain numbers for the cost columns. ``paper`` entries (from a
recipe, see ``lorabench.reproduce``) add a "paper" and a "Δ" column next to each dataset column
they match; only entries whose status is verified are passed in by the caller.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import html
import io
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lorabench.results.record import iter_records
from lorabench.results.runs import run_state

FORMATS = ("md", "csv", "json", "latex", "html")
# (header, getter, format, higher_is_better or None for "do not mark")
COST_COLUMNS = (
    ("trainable params", lambda r: r["cost"].get("trainable_params"), "{:,.0f}", False),
    ("peak mem MB", lambda r: _peak_mb(r), "{:,.0f}", False),
    ("opt-state MB", lambda r: _mb(r["cost"].get("optimizer_state_bytes")), "{:,.2f}", False),
    ("tokens/s", lambda r: r["cost"].get("tokens_per_s"), "{:,.0f}", True),
)
INTRUDERS = ("intruders", lambda r: (r.get("analysis") or {}).get("intruders_total"), "{:,.1f}", None)
SCALE = 100.0  # metric cells are the 0..1 metrics x 100, like the papers' tables
_UNSET = object()


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


def lookup(record: dict, dotted: str, default=None):
    """``record["config"]`` at a dotted path (``method.rank``), else the record itself at that path."""
    for root in (record.get("config") or {}, record):
        node = root
        for part in dotted.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                node = _UNSET
                break
        if node is not _UNSET:
            return node
    return default


def _drop(config: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


VARIANT_IGNORED = ("seed", "dataset", "results_dir", "force", "progress", "tracker", "hardware", "resume", "checkpoint")
MAX_LABEL_KEYS = 4  # more differing keys than this: the label ends in a short config hash


def _variant_config(record: dict, group_by: tuple[str, ...] = ()) -> dict:
    cfg = {k: copy.deepcopy(v) for k, v in record["config"].items() if k not in VARIANT_IGNORED}
    for key in group_by:
        _drop(cfg, key)
    return cfg


def _variant(record: dict, group_by: tuple[str, ...] = ()) -> str:
    blob = json.dumps(_variant_config(record, group_by), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:6]


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else value
    return flat


def _short(key: str) -> str:
    """method keys are what a variant usually changes (rank=16); a protocol's own keys likewise
    (aggregation=fedsvd, strategy=ilora)."""
    for prefix in (
        "method.",
        "protocol.federated.",
        "protocol.continual.",
        "protocol.compose.",
        "protocol.compressed.",
    ):
        key = key.removeprefix(prefix)
    return key


def variant_labels(records: list[dict], group_by: tuple[str, ...] = ()) -> dict[str, str]:
    """Row label of each record's variant, keyed by ``_variant``: the method label alone when the
    label has one variant, else the label plus the config values that tell its variants apart
    (``lora rank=16``, ``galore train.lr=0.001 update_proj_gap=50``); the differing keys are found
    among the variants of the same label and model only, so a label does not change when other
    methods' runs are added, nor with ``--group-by`` (group-by keys are columns)."""
    by_label: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        by_label[(r["method"]["label"], r["model"]["name"])][_variant(r, group_by)] = _flatten(
            _variant_config(r, group_by)
        )
    labels = {}
    for (label, _), variants in by_label.items():
        if len(variants) == 1:
            labels.update({v: label for v in variants})
            continue
        keys = sorted({k for flat in variants.values() for k in flat})
        differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in variants.values()}) > 1]
        for variant, flat in variants.items():
            parts = [f"{_short(k)}={_fmt_key(flat.get(k))}" for k in differing[:MAX_LABEL_KEYS]]
            extra = f" [{variant}]" if len(differing) > MAX_LABEL_KEYS else ""
            labels[variant] = " ".join([label, *parts]) + extra
    return labels


def reported_value(record: dict) -> float | None:
    metrics = record["metrics"]
    chosen = metrics.get("best") if metrics.get("report") == "best" else metrics.get("final")
    return None if not chosen else chosen.get(metrics["primary"])


def stats(values: list[float], scale: float = SCALE) -> dict:
    """mean, std (None for one value) and n of a metric cell, x ``scale``."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) * scale if len(values) > 1 else None
    return {"mean": statistics.fmean(values) * scale, "std": std, "n": len(values)}


def fmt_stats(values: list[float], scale: float = SCALE) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f} (n={len(values)})"


def protocol_of(record: dict) -> str:
    """The record's protocol (``single`` for records without one)."""
    return ((record.get("config") or {}).get("protocol") or {}).get("name", "single")


def collect(root: Path, methods=None, models=None, datasets=None, protocol: str = "single"):
    records, problems, excluded = [], [], defaultdict(int)
    for path, record, problem in iter_records(root):
        if problem:
            problems.append((path, problem))
            continue
        if protocol_of(record) != protocol:  # each protocol has its own table
            continue
        if methods and record["method"]["label"] not in methods:
            continue
        if models and record["model"]["name"] not in models:
            continue
        if datasets and record["dataset"]["name"] not in datasets:
            continue
        if record["status"] != "completed":
            excluded[run_state(record, path)[0]] += 1  # "stale": running, but its owner is gone
            continue
        records.append(record)
    return records, problems, excluded


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to mark
    notes: list[str] = field(default_factory=list)
    # the numbers behind each row's cells, by column title: {"mean", "std", "n"} for a metric column
    # (x 100, std None for n = 1), a number (or None) for the others; csv and json print these
    values: list[dict] = field(default_factory=list)


def _fmt_key(value) -> str:
    return "–" if value is None else str(value)


def paper_match(entry: dict, label: str, model: str, dataset: str, metric: str, sample: dict) -> bool:
    """Does a recipe's paper entry describe this row x column? Every key it names must agree."""
    if entry.get("method") != label or entry.get("dataset") != dataset:
        return False
    if entry.get("model") and entry["model"] != model:
        return False
    if entry.get("metric") and entry["metric"] != metric:
        return False
    return all(lookup(sample, k) == v for k, v in (entry.get("match") or {}).items())


def _mark_best(rows_values: list[float | None], higher: bool) -> set[int]:
    present = [(i, v) for i, v in enumerate(rows_values) if v is not None]
    if len(present) < 2:
        return set()
    target = (max if higher else min)(v for _, v in present)
    return {i for i, v in present if abs(v - target) <= 1e-9 * max(1.0, abs(target))}


def build_rows(records: list[dict], group_by: tuple[str, ...] = (), paper: list[dict] | None = None) -> Table:
    group_by = tuple(group_by or ())
    labels = variant_labels(records, group_by)
    columns: dict[tuple, None] = {}
    col_higher: dict[tuple, bool] = {}
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    cell_sample: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    row_records: dict[tuple, list[dict]] = defaultdict(list)

    def sort_key(r):
        return (r["method"]["label"], r["model"]["name"], *(_fmt_key(lookup(r, k)) for k in group_by))

    for r in sorted(records, key=sort_key):
        model = r["model"]["name"]
        row = (labels[_variant(r, group_by)], model, *(_fmt_key(lookup(r, k)) for k in group_by))
        col = (r["dataset"]["name"], r["dataset"]["version"], source_key(r), r["metrics"]["primary"])
        columns[col] = None
        col_higher.setdefault(col, bool(r["metrics"].get("higher_is_better", True)))
        value = reported_value(r)
        if value is not None:
            cells[row][col].append(value)
        cell_sample[row].setdefault(col, r)
        row_records[row].append(r)

    multi_source = defaultdict(set)
    for name, _, src, _ in columns:
        multi_source[name].add(src)
    keys = list(row_records)
    header = ["method", "model", *group_by]
    body: list[list[str]] = [list(k) for k in keys]
    numbers: list[dict] = [dict(zip(header, k)) for k in keys]
    best: set[tuple[int, int]] = set()
    notes: list[str] = []

    for col in columns:
        name, version, src, metric = col
        suffix = f" @{src.split(':')[0]}" if len(multi_source[name]) > 1 or src.startswith("generated") else ""
        means = [statistics.fmean(cells[k][col]) * SCALE if cells[k].get(col) else None for k in keys]
        header.append(f"{name}{suffix} v{version} {metric}")
        best |= {(i, len(header) - 1) for i in _mark_best(means, col_higher[col])}
        for i, k in enumerate(keys):
            body[i].append(fmt_stats(cells[k].get(col, [])))
            numbers[i][header[-1]] = stats(cells[k].get(col, []))
        if paper:
            theirs = []
            for k in keys:
                sample = cell_sample[k].get(col)
                hit = (
                    None
                    if sample is None
                    else next(
                        (e for e in paper if paper_match(e, sample["method"]["label"], k[1], name, metric, sample)),
                        None,
                    )
                )
                theirs.append(hit)
            if any(theirs):
                verified = all(str(h.get("status", "")).startswith("verified") for h in theirs if h)
                header += [f"{name} paper" if verified else f"{name} paper/2nd-hand†", f"{name} Δ"]
                for i, (hit, mean) in enumerate(zip(theirs, means)):
                    numbers[i][header[-2]] = None if hit is None else hit["value"]
                    numbers[i][header[-1]] = None if hit is None or mean is None else mean - hit["value"]
                    if hit is None:
                        body[i] += ["–", "–"]
                        continue
                    body[i].append(f"{hit['value']:.2f} [{hit.get('table', '?')}]")
                    body[i].append("–" if mean is None else f"{mean - hit['value']:+.2f}")
                    note = f"[{hit.get('table', '?')}] {hit.get('source', '')} ({hit.get('status', '')})".strip()
                    if note not in notes:
                        notes.append(note)

    extra = [INTRUDERS] if any((r.get("analysis") or {}).get("intruders_total") is not None for r in records) else []
    for title, getter, pattern, higher in (*COST_COLUMNS, *extra):
        header.append(title)
        means = []
        for i, k in enumerate(keys):
            values = [v for v in (getter(r) for r in row_records[k]) if v is not None]
            means.append(statistics.fmean(values) if values else None)
            body[i].append(pattern.format(means[-1]) if values else "–")
        for i, mean in enumerate(means):
            numbers[i][title] = mean
        if higher is not None:
            best |= {(i, len(header) - 1) for i in _mark_best(means, higher)}
    return Table(header, body, best, notes, numbers)


def table_rows(records: list[dict], group_by: tuple[str, ...] = ()) -> tuple[list[str], list[list[str]]]:
    """(header, rows) without best marks; kept for callers that want plain strings."""
    table = build_rows(records, group_by)
    return table.header, table.rows


def _marked(table: Table, fmt: str) -> list[list[str]]:
    out = []
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row):
            if (i, j) not in table.best:
                cells.append(cell)
            elif fmt == "md":
                cells.append(f"**{cell}**")
            else:
                cells.append(cell)  # latex and html mark while escaping
        out.append(cells)
    return out


def _numeric_csv(table: Table) -> str:
    """Numbers only (no marks, no thousands separators): a metric column becomes ``<title> mean``,
    ``<title> std`` and ``<title> n``; an empty cell is empty."""
    columns: list[tuple[str, str | None]] = []  # (title, stats field or None)
    for title in table.header:
        is_stats = any(isinstance(row.get(title), dict) for row in table.values)
        columns += [(title, part) for part in ("mean", "std", "n")] if is_stats else [(title, None)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([title if part is None else f"{title} {part}" for title, part in columns])
    for row in table.values:
        cells = [row.get(title) if part is None else (row.get(title) or {}).get(part) for title, part in columns]
        writer.writerow(["" if c is None else c for c in cells])
    return buf.getvalue().rstrip("\n")


def _latex_escape(s: str) -> str:
    return (
        s.replace("\\", r"\textbackslash{}")
        .replace("_", r"\_")
        .replace("%", r"\%")
        .replace("&", r"\&")
        .replace("#", r"\#")
        .replace("±", r"$\pm$")
        .replace("Δ", r"$\Delta$")
    )


def render_table(table: Table, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(table.values, indent=2)
    if fmt == "csv":
        return _numeric_csv(table)
    rows = _marked(table, fmt)
    header = table.header
    if fmt == "latex":
        lines = [
            r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}",
            r"\toprule",
            " & ".join(_latex_escape(h) for h in header) + r" \\",
            r"\midrule",
        ]
        for i, row in enumerate(rows):
            cells = [
                (r"\textbf{" + _latex_escape(c) + "}") if (i, j) in table.best else _latex_escape(c)
                for j, c in enumerate(row)
            ]
            lines.append(" & ".join(cells) + r" \\")
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])
    if fmt == "html":
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = []
        for i, row in enumerate(rows):
            tds = "".join(
                f'<td class="best"><strong>{html.escape(c)}</strong></td>'
                if (i, j) in table.best
                else f"<td>{html.escape(c)}</td>"
                for j, c in enumerate(row)
            )
            body.append(f"<tr>{tds}</tr>")
        return (
            '<table class="lorabench-table">\n<thead><tr>'
            + head
            + "</tr></thead>\n<tbody>\n"
            + "\n".join(body)
            + "\n</tbody>\n</table>"
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """Render plain rows (no best marks; csv and json print the strings as given)."""
    values = [dict(zip(header, row)) for row in rows]
    return render_table(Table(header, rows, values=values), fmt)


def footnote(table: Table, excluded: dict) -> str:
    text = (
        "Metric cells: reported primary metric x 100, mean ± std over seeds (n runs). "
        "Best per column in bold (lowest for params, memory and optimizer state; highest otherwise)."
    )
    if table.notes:
        text += " Paper numbers: " + "; ".join(table.notes) + ". Δ = ours − paper."
    if excluded:
        text += " Not shown: " + ", ".join(f"{n} {status}" for status, n in sorted(excluded.items())) + " runs."
    return text


def build_table(
    root: Path,
    fmt: str = "md",
    methods=None,
    models=None,
    datasets=None,
    group_by=(),
    paper: list[dict] | None = None,
    protocol: str = "single",
) -> tuple[str, list]:
    """The rendered table of one protocol's records (lorabench.results.protocol_table for the
    federated and continual ones) and the list of (path, problem) for unreadable or invalid records."""
    records, problems, excluded = collect(root, methods, models, datasets, protocol)
    if not records:
        suffix = "" if protocol == "single" else f" with protocol={protocol}"
        return f"no completed records{suffix} under {root}", problems
    if protocol == "single":
        table, note = build_rows(records, tuple(group_by or ()), paper), None
    else:
        from lorabench.results.protocol_table import build_protocol_rows

        table, note = build_protocol_rows(records, protocol, tuple(group_by or ()))
    text = render_table(table, fmt)
    foot = note or footnote(table, excluded)
    if note and excluded:
        foot += " Not shown: " + ", ".join(f"{n} {status}" for status, n in sorted(excluded.items())) + " runs."
    if fmt == "md":
        text += "\n\n" + foot
    elif fmt == "html":
        text += f'\n<p class="note">{html.escape(foot)}</p>'
    return text, problems
