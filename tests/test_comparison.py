"""Comparison outputs on synthetic records: tables (group-by, best marks, html, paper columns,
intruders), plots (PNG and SVG with one point per method variant), the offline HTML report, and
the report as headless Chromium renders it (skipped when chromium is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.results import plot
from lorabench.results.record import SCHEMA_VERSION, write_json_atomic
from lorabench.results.report import build_report
from lorabench.results.table import build_table


def rec(
    root: Path,
    label: str,
    seed: int,
    acc: float,
    *,
    rank=8,
    mem_mb=100.0,
    params=1000,
    model="tiny",
    dataset="sst2",
    intruders=None,
    rank_curve=None,
) -> dict:
    rid = f"{label}-{dataset}-{model}-s{seed}-r{rank}"
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": rid,
        "status": "completed",
        "error": None,
        "config": {
            "seed": seed,
            "method": {"label": label, "rank": rank},
            "dataset": {"name": dataset},
            "model": {"name": model},
        },
        "config_hash": rid,
        "method": {"label": label},
        "model": {"name": model},
        "dataset": {"name": dataset, "version": "1", "source": {"kind": "local", "path": "/d"}},
        "metrics": {
            "primary": "accuracy",
            "higher_is_better": True,
            "report": "last",
            "final": {"accuracy": acc},
            "best": {"accuracy": acc, "step": 4},
        },
        "history": [{"step": 2, "metrics": {"accuracy": acc / 2}}, {"step": 4, "metrics": {"accuracy": acc}}],
        "train_log": [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in (1, 2, 3, 4)],
        "cost": {
            "trainable_params": params,
            "optimizer_state_bytes": 2 * params * 4,
            "tokens_per_s": 500.0 + seed,
            "peak_memory": {"cpu_peak_rss_bytes": int(mem_mb * 2**20)},
        },
        "method_report": {"rank_curve": rank_curve} if rank_curve else {},
        "hardware": {},
        "provenance": {},
    }
    if intruders is not None:
        record["analysis"] = {"intruders_total": intruders}
    write_json_atomic(root / rid / "record.json", record)
    return record


@pytest.fixture()
def results(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed in (0, 1):
        rec(root, "lora", seed, 0.80 + 0.02 * seed, rank=4, mem_mb=100, params=1000, intruders=3)
        rec(root, "lora", seed, 0.84 + 0.02 * seed, rank=16, mem_mb=110, params=4000, intruders=5)
        rec(root, "full", seed, 0.90, mem_mb=300, params=100000, rank=0, intruders=0)
    rec(root, "galore", 0, 0.70, mem_mb=250, params=100000, rank=8)  # dominated: more memory, lower accuracy
    rec(root, "dylora", 0, 0.75, mem_mb=105, params=1000, rank=8, rank_curve={"1": 0.6, "2": 0.7, "4": 0.75})
    return root


def rows_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_group_by_makes_row_keys_without_hash_suffix(results):
    text, _ = build_table(results, group_by=["method.rank"])
    header = text.splitlines()[0]
    assert "| method.rank |" in header
    lora = [r for r in rows_of(text) if r.startswith("| lora")]
    assert len(lora) == 2 and not any("[" in r for r in lora)
    assert any("| 4 |" in r for r in lora) and any("| 16 |" in r for r in lora)
    # without --group-by the two ranks are variants told apart by the value that differs
    plain = [r for r in rows_of(build_table(results)[0]) if r.startswith("| lora")]
    assert sorted(r.split(" | ")[0] for r in plain) == ["| lora rank=16", "| lora rank=4"]


def test_best_values_marked_in_every_format(results):
    md = build_table(results, group_by=["method.rank"])[0]
    full = next(r for r in rows_of(md) if r.startswith("| full"))
    assert "**90.00 ± 0.00 (n=2)**" in full  # highest accuracy
    lora4 = next(r for r in rows_of(md) if r.startswith("| lora") and "| 4 |" in r)
    assert "**1,000**" in lora4 and "**100**" in lora4  # fewest params, least memory
    assert "**" not in next(r for r in rows_of(md) if r.startswith("| galore")).split("|")[4]
    csv_text = build_table(results, "csv")[0]
    assert "*" not in csv_text and "±" not in csv_text  # csv holds numbers only (tests/test_table.py)
    latex = build_table(results, "latex")[0]
    assert r"\textbf{90.00 $\pm$ 0.00 (n=2)}" in latex
    html_text = build_table(results, "html")[0]
    assert "<strong>90.00 ± 0.00 (n=2)</strong>" in html_text and html_text.startswith("<table")


def test_intruders_column_when_records_have_it(results):
    text = build_table(results, group_by=["method.rank"])[0]
    assert "intruders" in text.splitlines()[0]
    lora16 = next(r for r in rows_of(text) if r.startswith("| lora") and "| 16 |" in r)
    assert lora16.rstrip(" |").endswith("5.0")


def test_vs_paper_shows_verified_numbers_only(results):
    paper = [
        {
            "method": "lora",
            "model": "tiny",
            "dataset": "sst2",
            "match": {"method.rank": 4},
            "value": 79.0,
            "table": "T1",
            "status": "verified-paper",
            "source": "pdf",
        }
    ]
    text = build_table(results, group_by=["method.rank"], paper=paper)[0]
    assert "sst2 paper" in text.splitlines()[0] and "sst2 Δ" in text.splitlines()[0]
    lora4 = next(r for r in rows_of(text) if r.startswith("| lora") and "| 4 |" in r)
    assert "79.00 [T1]" in lora4 and "+2.00" in lora4  # ours 81.00 - 79.00
    other_model = [{**paper[0], "model": "roberta_base"}]  # smoke-scale records never meet paper numbers
    assert "paper" not in build_table(results, paper=other_model)[0].splitlines()[0]


def test_table_cli_group_by_and_vs_paper(results, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "table",
                "--results-dir",
                str(results),
                "--group-by",
                "method.rank",
                "--format",
                "html",
                "--vs-paper",
                "peft_metamathqa_llama3",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "<th>method.rank</th>" in out and "paper" not in out.split("</thead>")[0]


def test_pareto_plots_png_and_svg_one_point_per_variant(results, tmp_path):
    records = [json.loads(p.read_text()) for p in results.rglob("record.json")]
    for x in ("peak_mem", "params", "opt_state", "tokens_per_s", "cost.train_time_s"):
        plot.field_spec(x)
    paths, points = plot.plot_pareto(records, tmp_path / "plots" / "pareto", "peak_mem", "metric", ("method.rank",))
    assert sorted(p.suffix for p in paths) == [".png", ".svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (pts,) = points.values()
    assert len(pts) == 5  # lora r4, lora r16, full, galore, dylora
    front = {p.label for p in pts if p.front}
    assert front == {"lora rank=4", "lora rank=16", "full rank=0"}
    lora4 = next(p for p in pts if p.label == "lora rank=4")
    assert lora4.n == 2 and lora4.y == pytest.approx(81.0) and lora4.y_std == pytest.approx(1.4142, abs=1e-3)
    svg = next(p for p in paths if p.suffix == ".svg").read_text()
    assert len(re.findall(r'id="point-\d+"', svg)) == 5 and 'id="front"' in svg


def test_curves_and_rank_curves(results, tmp_path):
    records = [json.loads(p.read_text()) for p in results.rglob("record.json")]
    paths = plot.plot_curves(records[0], tmp_path)
    assert {p.suffix for p in paths} == {".png", ".svg"}
    svg = next(p for p in paths if p.suffix == ".svg").read_text()
    assert 'id="curve-loss"' in svg and 'id="curve-eval"' in svg
    ranks = plot.plot_rank_curves(records, tmp_path / "ranks")
    assert len(ranks) == 2 and 'id="curve-0"' in ranks[1].read_text() and 'id="curve-1"' not in ranks[1].read_text()
    # separately trained runs at each rank sit beside the curve (mean over seeds); rank 0 (full) is no rank
    trained = plot.trained_rank_points(records)
    assert trained["lora"] == [(4, pytest.approx(81.0), 2), (16, pytest.approx(85.0), 2)]
    assert "full" not in trained and "dylora" not in trained
    assert 'id="trained-lora"' in ranks[1].read_text()


def test_plot_cli(results, tmp_path, capsys):
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as exc:
        main(["plot", "--results-dir", str(results), "--out", str(out), "--x", "peak_mem", "--x", "params"])
    assert exc.value.code == 0
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"pareto_metric_vs_peak_mem.png", "pareto_metric_vs_params.svg", "rank_curves.svg"} <= names
    assert len([n for n in names if n.endswith(".curves.png")]) == 8
    with pytest.raises(SystemExit) as exc:
        main(["plot", "--results-dir", str(results), "--out", str(out), "--x", "nonsense"])
    assert exc.value.code == 2 and "unknown field 'nonsense'" in capsys.readouterr().err


class _Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v and not v.startswith("#")]


def test_report_html_structure_is_offline(results, tmp_path):
    text, problems = build_report(results, title="t")
    assert not problems
    doc = _Structure()
    doc.feed(text)
    assert doc.tags.get("table") == 1 and doc.tags.get("tr") == 1 + 5  # header + 5 variants
    assert doc.tags.get("svg") == 4 + 1 + 8  # 4 Pareto plots, 1 rank curve, 8 runs' curves
    assert "script" not in doc.tags and "link" not in doc.tags and "img" not in doc.tags
    assert doc.urls == []  # nothing to fetch: no external CSS, JS, fonts or images
    assert "<strong>90.00 ± 0.00 (n=2)</strong>" in text
    with pytest.raises(SystemExit) as exc:
        main(["report", "--results-dir", str(results), "--out", str(tmp_path / "r.html")])
    assert exc.value.code == 0 and (tmp_path / "r.html").stat().st_size > 10_000


PROBE = """<script>
const vis = e => { const r = e.getBoundingClientRect(); return r.width > 20 && r.height > 20; };
const probe = {
  tables: [...document.querySelectorAll('table')].filter(vis).length,
  rows: [...document.querySelectorAll('tbody tr')].filter(e => e.getBoundingClientRect().height > 5).length,
  svgs: [...document.querySelectorAll('figure svg')].filter(vis).length,
  bold: [...document.querySelectorAll('td strong')].filter(e => getComputedStyle(e).fontWeight >= 600).length,
  text: document.querySelector('table').innerText.includes('90.00'),
};
const out = document.createElement('pre'); out.id = 'probe-out'; out.textContent = JSON.stringify(probe);
document.body.appendChild(out);
</script></body>"""

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(results, tmp_path):
    text, _ = build_report(results)
    page = tmp_path / "page.html"  # a copy with a probe script; the report itself has no script
    page.write_text(text.replace("</body>", PROBE), encoding="utf-8")
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe-out">(\{.*?\})</pre>', dom)
    assert found, dom[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe == {"tables": 1, "rows": 5, "svgs": 13, "bold": probe["bold"], "text": True}
    assert probe["bold"] >= 5
    shot = tmp_path / "shot.png"
    report = tmp_path / "report.html"
    report.write_text(text, encoding="utf-8")
    subprocess.run([*flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 500 and pixels[..., :3].std() > 0.05  # something was drawn, not a blank page
