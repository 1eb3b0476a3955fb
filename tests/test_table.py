"""`lorabench table` on synthetic records: seeds aggregate as mean ± std with n, sources and
versions never mix, broken records are reported and skipped, all formats render."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.results.record import SCHEMA_VERSION, write_json_atomic
from lorabench.results.table import build_table


def make_record(
    root: Path,
    label: str,
    seed: int,
    acc: float,
    *,
    dataset="sst2",
    source="local",
    version="1",
    status="completed",
    rank=8,
) -> dict:
    rid = f"{label}-{dataset}-{source}-{version}-s{seed}-r{rank}"
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": rid,
        "status": status,
        "error": None,
        "config": {
            "seed": seed,
            "method": {"label": label, "rank": rank},
            "dataset": {"name": dataset},
            "model": {"name": "tiny"},
        },
        "config_hash": rid,
        "method": {"label": label},
        "model": {"name": "tiny"},
        "dataset": {"name": dataset, "version": version, "source": {"kind": source, "path": f"/{source}"}},
        "metrics": {
            "primary": "accuracy",
            "higher_is_better": True,
            "report": "last",
            "final": {"accuracy": acc},
            "best": {"accuracy": acc, "step": 10},
        },
        "cost": {
            "trainable_params": 1000,
            "optimizer_state_bytes": 2 * 2**20,
            "tokens_per_s": 500.0,
            "peak_memory": {"cpu_peak_rss_bytes": 100 * 2**20},
        },
        "hardware": {},
        "provenance": {},
    }
    write_json_atomic(root / rid / "record.json", record)
    return record


def test_seeds_aggregate_mean_std_n(tmp_path):
    for seed, acc in enumerate([0.80, 0.82, 0.84]):
        make_record(tmp_path, "lora", seed, acc)
    make_record(tmp_path, "full", 0, 0.90)
    text, problems = build_table(tmp_path)
    assert not problems
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora"))
    assert "82.00 ± 2.00 (n=3)" in lora_row
    assert "90.00 (n=1)" in text
    assert "2.00" in lora_row and "1,000" in lora_row  # opt-state MB and trainable params


def test_sources_and_versions_never_average(tmp_path):
    make_record(tmp_path, "lora", 0, 0.80, source="local")
    make_record(tmp_path, "lora", 1, 0.60, source="hub")
    make_record(tmp_path, "lora", 2, 0.70, version="2")
    header = build_table(tmp_path, "md")[0].splitlines()[0]
    assert header.count("sst2") == 3
    text = build_table(tmp_path, "md")[0]
    assert "80.00 (n=1)" in text and "60.00 (n=1)" in text and "70.00 (n=1)" in text


def test_variants_of_one_label_are_separate_rows(tmp_path):
    make_record(tmp_path, "lora", 0, 0.8, rank=4)
    make_record(tmp_path, "lora", 0, 0.9, rank=16)
    rows = [line for line in build_table(tmp_path)[0].splitlines() if line.startswith("| lora")]
    assert sorted(r.split(" | ")[0] for r in rows) == ["| lora rank=16", "| lora rank=4"]  # the values that differ


def test_failed_runs_excluded_and_counted(tmp_path):
    make_record(tmp_path, "lora", 0, 0.8)
    make_record(tmp_path, "lora", 1, 0.1, status="failed")
    text, _ = build_table(tmp_path)
    assert "80.00 (n=1)" in text and "1 failed" in text


def test_corrupt_record_reported_not_fatal(tmp_path, capsys):
    make_record(tmp_path, "lora", 0, 0.8)
    bad = tmp_path / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "run_id": ')
    with pytest.raises(SystemExit) as exc:
        main(["table", "--results-dir", str(tmp_path)])
    assert exc.value.code == 0
    out = capsys.readouterr()
    assert "80.00 (n=1)" in out.out
    assert str(bad) in out.err


def _ill_typed(root: Path, name: str, edit) -> Path:
    record = make_record(root, name, 9, 0.5)
    edit(record)
    path = root / record["run_id"] / "record.json"
    path.write_text(json.dumps(record))
    return path


BROKEN_RECORDS = {
    "not-utf8": (lambda root: _raw(root, b'{"schema_version": 1, "run_id": "caf\xe9"}'), "not UTF-8"),
    "invalid-json": (lambda root: _raw(root, b"{nope"), "unreadable record"),
    "not-an-object": (lambda root: _raw(root, b"[1, 2]"), "not a JSON object"),
    "string-metric": (
        lambda root: _ill_typed(root, "strmetric", lambda r: r["metrics"]["final"].update(accuracy="0.9")),
        "metrics.final.accuracy",
    ),
    "string-cost": (
        lambda root: _ill_typed(root, "strcost", lambda r: r["cost"].update(trainable_params="many")),
        "cost.trainable_params",
    ),
    "list-metrics": (lambda root: _ill_typed(root, "listmetrics", lambda r: r.update(metrics=[1])), "metrics"),
    "number-label": (
        lambda root: _ill_typed(root, "numlabel", lambda r: r["method"].update(label=7)),
        "method.label",
    ),
    "string-peak-memory": (
        lambda root: _ill_typed(root, "strpeak", lambda r: r["cost"]["peak_memory"].update(cpu_peak_rss_bytes="1 GB")),
        "cost.peak_memory.cpu_peak_rss_bytes",
    ),
}


def _raw(root: Path, content: bytes) -> Path:
    path = root / "broken" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind", BROKEN_RECORDS)
def test_unreadable_or_ill_typed_record_is_skipped_and_reported(kind, tmp_path, capsys):
    """``lorabench table`` prints the table of the good records and names the bad one with its
    problem on stderr, exit 0, for bytes that are not UTF-8, invalid JSON or a value of the wrong type."""
    make_record(tmp_path, "lora", 0, 0.8)
    write, problem = BROKEN_RECORDS[kind]
    bad = write(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["table", "--results-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    assert "80.00 (n=1)" in out.out and "Traceback" not in out.err
    (line,) = [line for line in out.err.splitlines() if str(bad) in line]
    assert line.startswith("lorabench: skipped") and problem in line, line


@pytest.mark.parametrize("fmt,marker", [("md", "| method |"), ("csv", "method,model"), ("latex", r"\begin{tabular}")])
def test_formats(tmp_path, fmt, marker):
    make_record(tmp_path, "lora", 0, 0.8)
    assert marker in build_table(tmp_path, fmt)[0]


def test_filters(tmp_path):
    make_record(tmp_path, "lora", 0, 0.8)
    make_record(tmp_path, "full", 0, 0.9)
    text = build_table(tmp_path, methods=["full"])[0]
    assert "| full" in text and "| lora" not in text


def test_record_written_atomically_is_valid_json(tmp_path):
    rec = make_record(tmp_path, "lora", 0, 0.8)
    path = next(tmp_path.rglob("record.json"))
    assert json.loads(path.read_text()) == rec
    assert not list(tmp_path.rglob("*.tmp"))


def test_csv_and_json_hold_numbers(tmp_path):
    make_record(tmp_path, "lora", 0, 0.80)
    make_record(tmp_path, "lora", 1, 0.90)
    make_record(tmp_path, "dora", 0, 0.70)
    rows = list(csv.DictReader(io.StringIO(build_table(tmp_path, "csv")[0])))
    lora = next(r for r in rows if r["method"] == "lora")
    column = "sst2 v1 accuracy"
    assert float(lora[f"{column} mean"]) == pytest.approx(85.0)
    assert float(lora[f"{column} std"]) == pytest.approx(7.0710678, rel=1e-6)
    assert lora[f"{column} n"] == "2"
    dora = next(r for r in rows if r["method"] == "dora")
    assert dora[f"{column} std"] == "" and dora[f"{column} n"] == "1"  # no std for one seed
    assert all(not any(ch in cell for ch in "*±,") for r in rows for cell in r.values())
    assert float(lora["trainable params"]) > 0
    data = json.loads(build_table(tmp_path, "json")[0])
    assert next(r for r in data if r["method"] == "lora")[column] == {
        "mean": pytest.approx(85.0),
        "std": pytest.approx(7.0710678, rel=1e-6),
        "n": 2,
    }


def test_variant_labels_name_what_differs_and_stay_stable(tmp_path):
    make_record(tmp_path, "lora", 0, 0.8, rank=4)
    make_record(tmp_path, "lora", 0, 0.9, rank=16)
    before = {r["method"] for r in json.loads(build_table(tmp_path, "json")[0])}
    make_record(tmp_path, "dora", 0, 0.7, rank=32)  # another method's runs do not relabel lora's
    after = {r["method"] for r in json.loads(build_table(tmp_path, "json")[0])}
    assert before == {"lora rank=4", "lora rank=16"} and after == before | {"dora"}
    grouped = json.loads(build_table(tmp_path, "json", group_by=["method.rank"])[0])
    assert sorted((r["method"], r["method.rank"]) for r in grouped) == [("dora", "32"), ("lora", "16"), ("lora", "4")]
