"""``lorabench bench`` at tiny scale: each method measured in its own process, the row's fields, the
optimizer state equal to its analytic formula, resume, and config errors before any measuring."""

from __future__ import annotations

import json
import time

import pytest

from lorabench import bench
from lorabench.errors import ConfigError


def _overrides(gsm8k_dir) -> list[str]:
    # accumulation 2 (global 4 = micro 2 x 2): the raw loop's accumulation is exercised too
    return [
        "model=tiny_llama",
        "dataset=gsm8k",
        f"dataset.data_dir={gsm8k_dir}",
        "dataset.max_length=64",
        "dataset.prompt_template=plain",
        "train.global_batch_size=4",
        "hardware.micro_batch_size=2",
        "train.max_steps=20",
    ]


@pytest.fixture(scope="module")
def bench_result(gsm8k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = bench.bench_command([*_overrides(gsm8k_dir), "--methods", "lora,galore", "--steps", "1", "--out", str(out)])
    return code, out, json.loads((out / "bench.json").read_text())


def test_bench_measures_each_method(bench_result):
    code, out, result = bench_result
    assert code == 0
    rows = {r["preset"]: r for r in result["rows"]}
    assert set(rows) == {"lora", "galore"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["harness_steps_s"]) == len(row["raw_steps_s"]) == 1
        assert row["overhead_ratio"] == pytest.approx(row["harness_step_s"] / row["raw_step_s"])
        assert row["tokens_per_step"] > 0 and row["tokens_per_s"] > 0
        assert row["gflop_per_step"] > 0 and 0 < row["peak_share"]
        assert row["peak_memory_mb"] > 0 and row["peak_memory_kind"] == "cpu rss"
        assert row["model_source"]["kind"] == "random" and row["dataset_source"]["kind"] == "local"
    # the optimizer state the harness holds equals its formula: Adam's two moments of LoRA's factors,
    # lorabench.budget's GaLore formula
    assert rows["lora"]["formula"] == "adam: 2 moments + step"
    assert rows["lora"]["optimizer_state_mb"] == pytest.approx(rows["lora"]["formula_state_mb"], rel=1e-9)
    lora_tensors = 2 * 2 * 2  # A and B of q_proj and v_proj in two layers
    assert rows["lora"]["optimizer_state_mb"] * 2**20 == 2 * 4 * rows["lora"]["trainable_params"] + 4 * lora_tensors
    assert rows["galore"]["formula"] == "galore"
    assert rows["galore"]["optimizer_state_mb"] == pytest.approx(rows["galore"]["formula_state_mb"], rel=1e-9)
    # GaLore projects the 2-D weights: its state is below full Adam's on the same trainable parameters
    assert rows["galore"]["optimizer_state_mb"] * 2**20 < 2 * 4 * rows["galore"]["trainable_params"]
    table = (out / "bench.md").read_text()
    assert "| harness/raw |" in table and "| lora |" in table and "| galore |" in table
    assert result["provenance"]["versions"]["torch"]


def test_bench_keeps_measured_rows(bench_result, gsm8k_dir, capsys):
    _, out, before = bench_result
    start = time.perf_counter()
    code = bench.bench_command([*_overrides(gsm8k_dir), "--methods", "lora", "--steps", "1", "--out", str(out)])
    assert code == 0 and time.perf_counter() - start < 20
    assert "lora: kept from" in capsys.readouterr().out
    after = json.loads((out / "bench.json").read_text())
    assert after["rows"] == before["rows"]


def test_bench_table_formats_ratios_with_three_decimals():
    result = {
        "settings": {"name": "t", "overrides": [], "steps": 1},
        "rows": [{"preset": "lora", "method": "lora", "status": "ok", "overhead_ratio": 1.0234, "peak_share": 0.5}],
    }
    assert "| 1.023 |" in bench.bench_table(result)


def test_bench_rejects_unknown_method_before_measuring(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"unknown method\(s\) no_such_method; valid choices: .*galore.*lora"):
        bench.bench_command(["--methods", "lora,no_such_method", "--out", str(tmp_path)])
    assert time.perf_counter() - start < 5
    assert not list(tmp_path.iterdir())


def test_bench_rejects_bad_steps_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="--steps must be at least 1, got 0"):
        bench.bench_command(["--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="train.lr"):
        bench.bench_command(["train.lr=-1", "--methods", "lora", "--out", str(tmp_path)])


def test_bench_all_lists_presets_that_need_input_instead_of_stopping(monkeypatch, tmp_path, capsys):
    """``--methods all``: X-LoRA (it needs trained experts) is a "not run" row with the reason; the
    same preset named explicitly stops the bench before anything is measured."""
    measured = []
    monkeypatch.setattr(bench, "preset_names", lambda: ["lora", "xlora"])
    monkeypatch.setattr(
        bench,
        "run_child",
        lambda method, *a: measured.append(method) or {"preset": method, "status": "failed", "error": "x"},
    )
    bench.bench_command(["--methods", "all", "--out", str(tmp_path)])
    rows = {r["preset"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert measured == ["lora"]
    assert rows["xlora"]["status"] == "not run" and "X-LoRA needs at least 2" in rows["xlora"]["error"]
    assert "| xlora |" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ConfigError, match="X-LoRA needs at least 2"):
        bench.bench_command(["--methods", "xlora", "--out", str(tmp_path / "named")])


def test_a_method_this_machine_cannot_run_is_a_not_run_row(tmp_path):
    """QLoRA's 4-bit base needs CUDA: without it the child writes a 'not run' row with the reason
    (the bench goes on and does not count it as a failure) before any weight loads."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA runs here")
    out = tmp_path / "row.json"
    code = bench.child_main([str(out), "1", *bench.method_overrides("qlora", [])])
    row = json.loads(out.read_text())
    assert code == 1 and row["status"] == "not run" and "needs CUDA" in row["error"], row
