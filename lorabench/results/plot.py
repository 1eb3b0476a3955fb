"""``lorabench plot``: figures from run records (matplotlib, Agg backend; PNG and SVG).

* Pareto front of any two record fields, one point per method variant (method label x model x
  ``--group-by`` keys; mean over seeds, error bars = std), one panel per dataset column. The
  non-dominated points are joined by a step line. Fields are short aliases (``metric``,
  ``peak_mem``, ``params``, ``opt_state``, ``tokens_per_s``, ...) or dotted record paths
  (``cost.train_time_s``, ``metrics.final.accuracy``, ``config.method.rank``).
* Loss and evaluation curves per run, from ``record["train_log"]`` and ``record["history"]``.
* Rank curves (DyLoRA-style: one model evaluated at several ranks) when a record carries
  ``record["method_report"]["rank_curve"]``, a mapping rank -> metric, beside the runs trained
  separately at each rank (``config.method.rank``), e.g.
  ``lorabench plot --kind ranks --method dylora --method lora``.

Every point and curve is an artist with a ``gid`` (``point-<i>``, ``front``, ``curve-<i>``), so an
SVG can be checked for what it shows.
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lorabench.results.table import (  # noqa: E402
    SCALE,
    _peak_mb,
    _variant,
    lookup,
    reported_value,
    source_key,
    variant_labels,
)

# alias -> (axis title, getter, higher_is_better or None for "take it from the record")
FIELDS = {
    "metric": ("primary metric x 100", lambda r: _scaled(reported_value(r)), None),
    "peak_mem": ("peak memory (MB)", _peak_mb, False),
    "params": ("trainable parameters", lambda r: r["cost"].get("trainable_params"), False),
    "opt_state": ("optimizer state (MB)", lambda r: _mb(r["cost"].get("optimizer_state_bytes")), False),
    "tokens_per_s": ("tokens / s", lambda r: r["cost"].get("tokens_per_s"), True),
    "train_time": ("train time (s)", lambda r: r["cost"].get("train_time_s"), False),
    "wall_time": ("wall time (s)", lambda r: r["cost"].get("wall_time_s"), False),
    "adapter_bytes": ("adapter file (bytes)", lambda r: r["cost"].get("adapter_file_bytes"), False),
    "intruders": ("intruder dimensions", lambda r: (r.get("analysis") or {}).get("intruders_total"), False),
}
ALIASES = {
    "memory": "peak_mem",
    "mem": "peak_mem",
    "trainable_params": "params",
    "optimizer_state": "opt_state",
    "opt_state_mb": "opt_state",
    "throughput": "tokens_per_s",
    "accuracy": "metric",
}
FORMATS = ("png", "svg")
INLINE_LABELS = 12  # above this many points per panel, points off the front get numbers and a side key


def _mb(value):
    return None if value is None else value / 2**20


def _scaled(value):
    return None if value is None else value * SCALE


def _record_path(record: dict, dotted: str):
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def field_spec(name: str):
    """(title, getter, higher_is_better or None). Unknown names are dotted record paths."""
    name = ALIASES.get(name, name)
    if name in FIELDS:
        return FIELDS[name]
    if "." not in name:
        raise ValueError(
            f"unknown field {name!r}; use one of {', '.join(FIELDS)} or a dotted record path "
            "such as cost.train_time_s or config.method.rank"
        )

    def getter(r):
        value = _record_path(r, name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return name, getter, None


def _direction(spec, records: list[dict]) -> bool:
    higher = spec[2]
    if higher is not None:
        return higher
    if spec[0].startswith("metrics.") or spec[0].startswith("primary"):
        return all(r["metrics"].get("higher_is_better", True) for r in records)
    return True


@dataclass
class Point:
    label: str
    x: float
    y: float
    x_std: float
    y_std: float
    n: int
    front: bool = False


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def panels(records: list[dict]) -> dict[str, list[dict]]:
    """Records split by dataset column (name, version, source, primary metric), as the table does."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        src = source_key(r).split(":")[0]
        out[f"{r['dataset']['name']} v{r['dataset']['version']} ({src}) {r['metrics']['primary']}"].append(r)
    return dict(out)


def pareto_points(records: list[dict], x: str, y: str, group_by: tuple[str, ...] = ()) -> list[Point]:
    """One point per method variant (mean over seeds); ``front`` marks the non-dominated ones."""
    xs, ys = field_spec(x), field_spec(y)
    variants = defaultdict(set)
    for r in records:
        variants[(r["method"]["label"], r["model"]["name"])].add(_variant(r, group_by))
    labels = variant_labels(records, group_by)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        model = r["model"]["name"]
        name = labels[_variant(r, group_by)]
        keys = "".join(f" {k.split('.')[-1]}={lookup(r, k)}" for k in group_by)
        models = {m for (_, m) in variants}
        groups[name + keys + (f" ({model})" if len(models) > 1 else "")].append(r)
    points = []
    for label, recs in sorted(groups.items()):
        pairs = [(xs[1](r), ys[1](r)) for r in recs]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        xv, yv = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
        points.append(Point(label, statistics.fmean(xv), statistics.fmean(yv), _std(xv), _std(yv), len(pairs)))
    hx, hy = _direction(xs, records), _direction(ys, records)

    def at_least(a: Point, b: Point) -> bool:  # a is at least as good as b on both axes
        return (a.x >= b.x if hx else a.x <= b.x) and (a.y >= b.y if hy else a.y <= b.y)

    for p in points:
        p.front = not any(at_least(q, p) and (q.x, q.y) != (p.x, p.y) for q in points)
    return points


def _save(fig, out_base: Path, formats=FORMATS) -> list[Path]:
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_base.with_name(out_base.name + "." + fmt)
        fig.savefig(path, format=fmt, bbox_inches="tight", dpi=110, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def pareto_figure(records: list[dict], x: str = "peak_mem", y: str = "metric", group_by: tuple[str, ...] = ()):
    """(figure, {panel: points})."""
    by_panel = panels(records)
    height = max(4.6, 0.085 * max((len(r) for r in by_panel.values()), default=0))  # room for a side key
    fig, axes = plt.subplots(1, max(1, len(by_panel)), figsize=(6.2 * max(1, len(by_panel)), height), squeeze=False)
    xs, ys = field_spec(x), field_spec(y)
    out = {}
    index = 0
    for ax, (panel, recs) in zip(axes[0], sorted(by_panel.items())):
        points = pareto_points(recs, x, y, group_by)
        out[panel] = points
        key: list[str] = []
        for p in points:
            art = ax.errorbar(
                [p.x],
                [p.y],
                xerr=[p.x_std],
                yerr=[p.y_std],
                fmt="o" if p.front else "s",
                color="C3" if p.front else "C0",
                capsize=3,
                markersize=6,
            )
            art[0].set_gid(f"point-{index}")
            index += 1
            label = f"{p.label} (n={p.n})"
            if len(points) > INLINE_LABELS and not p.front:  # crowded: a number here, the name in the key
                key.append(f"{len(key) + 1:>2} {label}")
                label = str(len(key))
            ax.annotate(label, (p.x, p.y), textcoords="offset points", xytext=(4, 3 + 8 * (index % 3)), fontsize=7)
        front = sorted((p for p in points if p.front), key=lambda p: p.x)
        if len(front) > 1:
            hx = _direction(xs, recs)
            (line,) = ax.plot(
                [p.x for p in front],
                [p.y for p in front],
                color="C3",
                alpha=0.6,
                drawstyle="steps-post" if not hx else "steps-pre",
            )
            line.set_gid("front")
        if key:
            ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, fontsize=6, va="top", family="monospace")
        ax.set_xlabel(xs[0])
        ax.set_ylabel(ys[0])
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        if x in ("params", "trainable_params") and all(p.x > 0 for p in points):
            ax.set_xscale("log")
    fig.suptitle(f"{ys[0]} vs {xs[0]} (red: Pareto front; mean ± std over seeds)", fontsize=10)
    return fig, out


def plot_pareto(
    records: list[dict],
    out_base: Path,
    x: str = "peak_mem",
    y: str = "metric",
    group_by: tuple[str, ...] = (),
    formats=FORMATS,
) -> tuple[list[Path], dict[str, list[Point]]]:
    fig, points = pareto_figure(records, x, y, group_by)
    return _save(fig, out_base, formats), points


def curves_figure(record: dict):
    """Training loss and evaluation metric against step for one run (None if it logged neither)."""
    log = [e for e in record.get("train_log") or [] if e.get("loss") is not None]
    hist = record.get("history") or []
    primary = record["metrics"].get("primary")
    evals = [(h["step"], h["metrics"][primary]) for h in hist if primary in (h.get("metrics") or {})]
    if not log and not evals:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if log:
        (line,) = ax1.plot([e["step"] for e in log], [e["loss"] for e in log], marker=".", color="C0")
        line.set_gid("curve-loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss")
    ax1.grid(alpha=0.3)
    if evals:
        (line,) = ax2.plot([s for s, _ in evals], [v * SCALE for _, v in evals], marker="o", color="C2")
        line.set_gid("curve-eval")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"eval {primary} x 100")
    ax2.grid(alpha=0.3)
    fig.suptitle(record["run_id"], fontsize=9)
    return fig


def plot_curves(record: dict, out_dir: Path, formats=FORMATS) -> list[Path]:
    fig = curves_figure(record)
    return [] if fig is None else _save(fig, out_dir / f"{record['run_id']}.curves", formats)


def rank_curve_records(records: list[dict]) -> list[dict]:
    return [
        r
        for r in records
        if isinstance((r.get("method_report") or {}).get("rank_curve"), dict) and r["method_report"]["rank_curve"]
    ]


def trained_rank_points(records: list[dict]) -> dict[str, list[tuple[int, float, int]]]:
    """label -> [(rank, mean metric x 100, n)] for runs trained at one rank (no rank curve), so that a
    rank curve can be compared with models trained separately at each rank."""
    by_label: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    curve_ids = {r["run_id"] for r in rank_curve_records(records)}
    for r in records:
        rank, value = lookup(r, "method.rank"), reported_value(r)
        if r["run_id"] in curve_ids or not isinstance(rank, int) or rank < 1 or value is None:
            continue
        by_label[r["config"]["method"]["label"]][int(rank)].append(value * SCALE)
    return {
        label: [(rank, statistics.mean(vals), len(vals)) for rank, vals in sorted(ranks.items())]
        for label, ranks in sorted(by_label.items())
    }


def rank_figure(records: list[dict]):
    """One line per run with a rank curve (metric at each evaluated rank), plus, dashed, the mean
    metric of runs trained separately at each rank (e.g. LoRA at r = 1, 2, 4, 8), one line per
    method label. None when no record has a rank curve."""
    recs = rank_curve_records(records)
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for i, r in enumerate(recs):
        curve = sorted((int(k), float(v)) for k, v in r["method_report"]["rank_curve"].items() if v is not None)
        scale = SCALE if all(abs(v) <= 1.0 for _, v in curve) else 1.0
        (line,) = ax.plot([k for k, _ in curve], [v * scale for _, v in curve], marker="o", label=r["run_id"])
        line.set_gid(f"curve-{i}")
    for label, points in trained_rank_points(records).items():
        (line,) = ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            linestyle="--",
            marker="s",
            label=f"{label}, trained at each rank (mean of n={'/'.join(str(p[2]) for p in points)})",
        )
        line.set_gid(f"trained-{label}")
    ax.set_xlabel("rank used at evaluation")
    ax.set_ylabel(f"{recs[0]['metrics'].get('primary', 'metric')} x 100")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("metric by evaluation rank (DyLoRA-style)", fontsize=10)
    return fig


def plot_rank_curves(records: list[dict], out_base: Path, formats=FORMATS) -> list[Path]:
    fig = rank_figure(records)
    return [] if fig is None else _save(fig, out_base, formats)


def svg_text(fig) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, no external references)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]
