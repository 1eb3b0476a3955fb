"""``lorabench report``: one static HTML page for a results folder, viewable offline.

The page holds the comparison table (best values in bold), Pareto plots of the primary metric
against peak memory, trainable parameters, optimizer-state MB and tokens/s, rank curves where
records carry them, and loss/eval curves per run. Figures are inline SVG; styles are inline; there
is no script and no external file, so the page can be mailed or archived as is.
"""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path

from lorabench.results import plot
from lorabench.results.table import build_rows, collect, footnote, render_table

PARETO_X = ("peak_mem", "params", "opt_state", "tokens_per_s")
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.lorabench-table { border-collapse: collapse; font-size: 13px; }
table.lorabench-table th, table.lorabench-table td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; }
table.lorabench-table th { background: #eee; }
table.lorabench-table td:first-child, table.lorabench-table td:nth-child(2) { text-align: left; }
td.best { background: #e8f5e9; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
.note { font-size: 12px; color: #555; max-width: 70em; }
"""


def _figure(fig, caption: str, cls: str) -> str:
    return f'<figure class="{cls}">{plot.svg_text(fig)}<figcaption>{html.escape(caption)}</figcaption></figure>'


def build_report(
    root: Path, title: str | None = None, group_by=(), paper: list[dict] | None = None, max_curves: int = 50
) -> tuple[str, list]:
    """(HTML text, problems) for every record under ``root``."""
    root = Path(root)
    records, problems, excluded = collect(root)
    title = title or f"lorabench report: {root}"
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(records)} completed runs; generated '
        f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}.</p>",
    ]
    if not records:
        parts.append(f"<p>No completed records under {html.escape(str(root))}.</p>")
    else:
        table = build_rows(records, tuple(group_by or ()), paper)
        parts += [
            "<h2>Comparison table</h2>",
            render_table(table, "html"),
            f'<p class="note">{html.escape(footnote(table, excluded))}</p>',
            "<h2>Pareto fronts</h2>",
        ]
        for x in PARETO_X:
            fig, points = plot.pareto_figure(records, x, "metric", tuple(group_by or ()))
            if any(points.values()):
                parts.append(_figure(fig, f"primary metric vs {plot.field_spec(x)[0]}", "pareto"))
            else:
                plot.plt.close(fig)
        fig = plot.rank_figure(records)
        if fig is not None:
            parts += ["<h2>Rank curves</h2>", _figure(fig, "metric by evaluation rank", "ranks")]
        parts.append("<h2>Training curves</h2>")
        shown = 0
        for r in sorted(records, key=lambda r: r["run_id"]):
            if shown >= max_curves:
                parts.append(f'<p class="note">{len(records) - shown} more runs not drawn (max_curves).</p>')
                break
            fig = plot.curves_figure(r)
            if fig is not None:
                parts.append(_figure(fig, r["run_id"], "curves"))
                shown += 1
    if problems:
        items = "".join(f"<li>{html.escape(str(p))}: {html.escape(msg)}</li>" for p, msg in problems)
        parts.append(f"<h2>Skipped records</h2><ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts), problems


def write_report(root: Path, out: Path, **kwargs) -> tuple[Path, list]:
    text, problems = build_report(root, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out, problems
