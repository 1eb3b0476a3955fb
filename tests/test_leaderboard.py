"""The leaderboard script's own logic: learning-rate grid and pick, the per-method rows, the report
that rewrites the README block, and the run ids that make the seed-0 copy and resuming exact."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from lorabench.config_store import compose
from lorabench.results.record import RECORD_NAME, SCHEMA_VERSION, run_id, write_json_atomic
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lb():
    yield load_script("leaderboard")
    sys.modules.pop("leaderboard", None)


def fake_record(root: Path, label: str, lr: float, seed: int, acc: float, **extra) -> dict:
    rid = f"{label}-sst2-minilm_l6-s{seed}-{lr:g}"
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": rid,
        "status": extra.pop("status", "completed"),
        "error": extra.pop("error", None),
        "config": {"seed": seed, "method": {"label": label}, "train": {"lr": lr}, "model": {"name": "minilm_l6"}},
        "config_hash": rid,
        "method": {"label": label, "paper": "arXiv:2106.09685", "family": "adapter", "adapter": "lora"},
        "model": {"name": "minilm_l6"},
        "dataset": {"name": "sst2", "version": "1", "source": {"kind": "local", "path": "/glue"}},
        "metrics": {"primary": "accuracy", "final": {"accuracy": acc}},
        "cost": {
            "trainable_params": extra.pop("params", 1000),
            "optimizer_state_bytes": 2**20,
            "tokens_per_s": 400.0 + seed,
            "wall_time_s": 100.0,
            "peak_memory": {"cpu_peak_rss_bytes": 512 * 2**20},
        },
        "analysis": {"intruders_total": seed},
        "method_report": extra.pop("method_report", {}),
        "hardware": {},
        "provenance": {},
    }
    write_json_atomic(root / rid / RECORD_NAME, record)
    return record


def test_lr_grid_has_family_default_and_extra_points(lb):
    assert lb.lr_grid("lora") == [lb.DEFAULT_LR, 1e-3]  # no extra points: the neighbour above
    assert lb.lr_grid("full") == [lb.FAMILY_LR["full"], 1e-4]
    assert lb.lr_grid("salt") == [1e-3, 2e-3]
    assert lb.lr_grid("nola") == sorted([lb.FAMILY_LR["nola"], *lb.EXTRA_LR["nola"]])


def test_pick_lr_takes_best_and_smaller_rate_on_ties(lb):
    assert lb.pick_lr({1e-4: 0.7, 5e-4: 0.8, 1e-3: 0.75}) == 5e-4
    assert lb.pick_lr({1e-3: 0.8, 5e-4: 0.8}) == 5e-4


def test_rows_aggregate_seeds_per_method_and_rate(lb, tmp_path):
    for seed, acc in enumerate([0.80, 0.82, 0.84]):
        fake_record(tmp_path, "lora", 5e-4, seed, acc)
    fake_record(tmp_path, "lora", 2e-3, 0, 0.5)  # another rate is another row, never averaged in
    fake_record(tmp_path, "full", 5e-5, 0, 0.9)
    rows = lb.leaderboard_rows(lb.completed(tmp_path))
    assert [(r["method"], r["lr"]) for r in rows] == [("full", 5e-5), ("lora", 5e-4), ("lora", 2e-3)]
    lora = rows[1]
    assert lora["n"] == 3 and lora["mean"] == pytest.approx(82.0) and lora["std"] == pytest.approx(2.0)
    assert lora["tokens_s"] == pytest.approx(401.0) and lora["intruders"] == pytest.approx(1.0)
    assert lora["peak_mb"] == pytest.approx(512) and lora["opt_mb"] == pytest.approx(1.0)
    table = lb.leaderboard_table(rows)
    assert "| 2 | lora | 82.00 ± 2.00 (3) | 0.0005 |" in table
    assert "[arXiv:2106.09685](https://arxiv.org/abs/2106.09685)" in table
    moved = lb.leaderboard_table(rows, picks={"lora": 1e-3, "full": 5e-5})  # the sweep moved lora's pick on
    assert "| 2 | lora | 82.00 ± 2.00 (3) | 0.0005 (sweep now picks 0.001; seeds not rerun yet) |" in moved
    assert "| 1 | full | 90.00 ± 0.00 (1) | 5e-05 |" in moved


def test_report_rewrites_only_the_readme_block(lb, tmp_path, monkeypatch):
    out = tmp_path / "lb"
    for seed in range(3):
        fake_record(out / "records", "lora", 5e-4, seed, 0.8 + seed / 100, params=lb.BUDGET)
    fake_record(out / "sweep", "lora", 5e-4, 0, 0.8)
    fake_record(
        out / "budget",
        "nola",
        5e-3,
        0,
        0.7,
        params=74_000,
        method_report={"budget": {"knob": "num_basis_a=num_basis_b", "value": 3000}},
    )
    fake_record(out / "budget", "loldu", 5e-3, 0, 0.0, status="failed", error={"message": "declares no size knob"})
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- leaderboard:start -->\nold\n<!-- leaderboard:end -->\noutro\n")
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    lb.write_report(out, ["lora", "nola", "xyz"])
    text = readme.read_text()
    assert text.startswith("intro\n<!-- leaderboard:start -->") and text.endswith("<!-- leaderboard:end -->\noutro\n")
    assert "old" not in text and "| 1 | lora | 81.00 ± 1.00 (3) |" in text
    assert "`xyz`: no completed record yet" in text and "`qlora`:" in text
    full = (out / "README.md").read_text()
    assert "| nola | num_basis_a=num_basis_b=3000 | 74,000 | 70.00 |" in full
    assert "`loldu`: declares no size knob" in full
    assert "| lora | preset (already at the budget) | 74,498 | 80.00 | 74,498, 81.00 (3) |" in full


def test_seed0_run_is_copied_from_the_sweep_by_run_id(lb, tmp_path):
    task = lb.overrides("lora", 5e-4, 0, tmp_path / "records", "/data/SST-2")
    sweep_task = lb.overrides("lora", 5e-4, 0, tmp_path / "sweep", "/data/SST-2")
    rid = run_id(compose(task))
    assert rid == run_id(compose(sweep_task))  # the results folder is not part of the run id
    assert rid != run_id(compose(lb.overrides("lora", 5e-4, 1, tmp_path / "records", "/data/SST-2")))
    write_json_atomic(tmp_path / "sweep" / rid / RECORD_NAME, {"run_id": rid})
    lb._copy_existing_run(task, tmp_path / "sweep", tmp_path / "records")
    assert (tmp_path / "records" / rid / RECORD_NAME).is_file()


def test_galore_family_runs_the_fine_tuning_setting(lb):
    cfg = compose(lb.overrides("galore", 3e-5, 0, Path("/tmp/x"), None))
    assert cfg["method"]["scale"] == 4 and cfg["method"]["update_proj_gap"] == 500
    assert compose(lb.overrides("fira", 1e-4, 0, Path("/tmp/x"), None))["method"]["scale"] == 0.25


def test_dct_adamw_runs_at_the_authors_defaults(lb):
    dct = lb.overrides("dct_adamw", 1e-4, 0, Path("/tmp/x"), None)
    assert not any(o.startswith(("method.scale", "method.update_proj_gap")) for o in dct)
    assert "scale" not in compose(dct)["method"] and compose(dct)["method"]["update_proj_gap"] == 1


def test_sweep_grid_grows_past_an_edge_pick_and_stops_inside(lb):
    base = lb.lr_grid("adalora")  # [5e-4, 2e-3, 5e-3]
    assert lb.sweep_grid("adalora", {}) == base  # nothing run yet: nothing to extend
    rising = {5e-4: 0.5, 2e-3: 0.6, 5e-3: 0.7}
    assert lb.sweep_grid("adalora", rising) == [*base, 1e-2]  # best at the top edge: one rate up
    assert lb.sweep_grid("adalora", {**rising, 1e-2: 0.65}) == [*base, 1e-2]  # interior now: stop
    still_rising = {**rising, 1e-2: 0.8, 2e-2: 0.9}
    assert lb.sweep_grid("adalora", still_rising) == [*base, 1e-2, 2e-2]  # at most MAX_EDGE_STEPS
    assert lb.MAX_EDGE_STEPS == 2
    falling = {1e-4: 0.8, 2e-4: 0.7, 5e-4: 0.6, 2e-3: 0.5, 5e-3: 0.5}
    assert lb.sweep_grid("nlora", falling) == [5e-5, *sorted(falling)]  # best at the bottom edge: one down
    assert lb.sweep_grid("lora", {5e-4: 0.79}) == [5e-4, 1e-3]  # the neighbour not run yet: nothing to extend
    assert lb.sweep_grid("lora", {5e-4: 0.79, 1e-3: 0.78}) == [2e-4, 5e-4, 1e-3]  # default wins: one rate down
    assert lb.sweep_grid("lora", {2e-4: 0.77, 5e-4: 0.79, 1e-3: 0.78}) == [2e-4, 5e-4, 1e-3]  # interior: stop
    assert lb.sweep_grid("lora", {5e-4: 0.79, 1e-3: 0.80}) == [5e-4, 1e-3, 2e-3]  # neighbour wins: one rate up


def test_sweep_results_only_count_points_of_the_grown_grid(lb, tmp_path):
    data = None
    for lr, acc in ((5e-4, 0.5), (2e-3, 0.6), (5e-3, 0.7), (1e-2, 0.75), (5e-2, 0.99)):
        fake = fake_record(tmp_path / "fakes", "adalora", lr, 0, acc)
        fake["run_id"] = run_id(compose(lb.overrides("adalora", lr, 0, tmp_path, data)))
        write_json_atomic(tmp_path / fake["run_id"] / RECORD_NAME, fake)
    shutil.rmtree(tmp_path / "fakes")
    found = lb.sweep_results(tmp_path, ["adalora"], data)
    # 1e-2 is the extension the results call for; 5e-2 (a stray ladder run) is not in the grown grid
    assert found == {"adalora": {5e-4: 0.5, 2e-3: 0.6, 5e-3: 0.7, 1e-2: 0.75}}


def test_runs_at_a_superseded_rate_are_moved_not_deleted(lb, tmp_path):
    records, superseded = tmp_path / "records", tmp_path / "superseded"
    old = fake_record(records, "adalora", 5e-3, 1, 0.7)
    new = fake_record(records, "adalora", 1e-2, 1, 0.8)
    other = fake_record(records, "lora", 5e-4, 1, 0.79)
    wanted = {("adalora", 1): new["run_id"], ("lora", 1): other["run_id"]}
    stray = fake_record(records, "vera", 5e-3, 1, 0.7)  # not managed (no pick): stays
    moved = lb.retire_superseded(records, lambda method, seed: wanted.get((method, seed)), superseded)
    assert moved == [old["run_id"]]
    assert (superseded / "records" / old["run_id"] / RECORD_NAME).is_file()
    assert sorted(p.name for p in records.iterdir()) == sorted([new["run_id"], other["run_id"], stray["run_id"]])


def test_rank_runs_at_a_replaced_rate_are_moved(lb, tmp_path):
    ranks, superseded = tmp_path / "ranks", tmp_path / "superseded"
    old = [fake_record(ranks, "lora", 5e-4, seed, 0.78) for seed in (0, 1)]
    new = fake_record(ranks, "lora", 2e-3, 0, 0.83)
    other = fake_record(ranks, "dylora", 5e-4, 0, 0.78)  # not in picks: stays
    moved = lb.retire_other_rates(ranks, {"lora": 2e-3}, superseded)
    assert sorted(moved) == sorted(r["run_id"] for r in old)
    assert all((superseded / "ranks" / r["run_id"] / RECORD_NAME).is_file() for r in old)
    assert sorted(p.name for p in ranks.iterdir()) == sorted([new["run_id"], other["run_id"]])


def test_optimizer_state_budget_covers_exactly_the_sizable_full_weight_optimizers(lb):
    from lorabench.launch import CONF_DIR
    from lorabench.methods.catalog import load_presets

    presets = load_presets(CONF_DIR / "method")
    chosen = lb.optimizer_budget_methods(sorted(presets), presets)
    assert chosen == ["fira", "frugal", "galore", "galore_torch"]  # not q_galore/dct_adamw (no formula), not lora_pro


def test_optimizer_budget_table_reports_solved_knob_and_state(lb, tmp_path):
    record = fake_record(tmp_path, "galore", 1e-4, 0, 0.8123, method_report={"budget": {"knob": "rank", "value": 107}})
    record["cost"]["optimizer_state_bytes"] = int(119.85 * 2**20)
    row = {"opt_mb": 93.31, "mean": 80.5, "n": 3}
    table = lb.optimizer_budget_table([record], {"galore": row})
    assert table.splitlines()[-1] == "| galore | rank=107 | 119.8 | 81.23 | 93.3, 80.50 (3) |"


def test_track_b_report_scores_bleu_into_its_own_readme_block(lb, tmp_path, monkeypatch):
    out = tmp_path / "b"
    for seed, bleu in ((0, 0.50), (1, 0.54)):
        record = fake_record(out / "records", "lora", 5e-4, seed, 0.0, params=lb.TRACK_B.budget_params)
        record["metrics"] = {"primary": "bleu", "final": {"bleu": bleu}}  # no accuracy in a generation record
        write_json_atomic(out / "records" / record["run_id"] / RECORD_NAME, record)
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- leaderboard:start -->\nA\n<!-- leaderboard:end -->\n"
        "<!-- leaderboard-b:start -->\nB\n<!-- leaderboard-b:end -->\n"
    )
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    lb.write_report(out, ["lora", "dora"], lb.TRACK_B)
    text = readme.read_text()
    assert "<!-- leaderboard:start -->\nA\n<!-- leaderboard:end -->" in text  # Track A's block untouched
    assert "B\n" not in text and "| 1 | lora | 52.00 ± 2.83 (2) |" in text and "E2E BLEU (mean ± std, n)" in text
    assert "`dora`: no completed record yet" in text and "`qlora`:" in text and "`xlora`:" in text
    assert "common optimizer-state budget: 450 MiB" in (out / "README.md").read_text()


def test_track_b_protocol_composes_and_hardware_changes_the_run_id(lb, tmp_path):
    from lorabench.validate import build_run

    cpu = compose(lb.overrides("lora", 5e-4, 0, tmp_path, "/data/e2e", lb.TRACK_B))
    cfg, spec = build_run(cpu)  # validates the protocol: a generation dataset on a decoder model
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.num_beams, cfg.train.max_steps) == (
        "smollm2_135m",
        "e2e",
        1,
        40,
    )
    assert cfg.hardware.micro_batch_size == 4 and cfg.hardware.mixed_precision == "bf16" and spec.label == "lora"
    assert cfg.dataset.train_size == cfg.train.max_steps * cfg.train.global_batch_size  # one epoch
    gpu_task = lb.overrides("lora", 5e-4, 0, tmp_path, "/data/e2e", lb.TRACK_B, hardware="gpu")
    assert "hardware=gpu" in gpu_task and "hardware=cpu" not in gpu_task
    assert run_id(compose(gpu_task)) != run_id(cpu)
    # Track A's cpu task list is the protocol itself, so its existing run ids do not move
    assert lb.overrides("lora", 5e-4, 0, tmp_path, None)[1 : 1 + len(lb.PROTOCOL)] == lb.PROTOCOL


def test_bad_hardware_is_rejected_before_any_run(lb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["leaderboard.py", "--track", "b", "--hardware", "gpux", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        lb.main()
    presets = sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml"))
    assert exc.value.code == 2 and f"unknown --hardware 'gpux'; valid: {presets}" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():  # a CUDA preset on a machine without CUDA: one clear error, no run starts
        monkeypatch.setattr(sys, "argv", ["leaderboard.py", "--hardware", "gpu", "--out", str(tmp_path)])
        with pytest.raises(SystemExit):
            lb.main()
        assert "needs CUDA" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_track_b_start_rates_are_rates_track_a_ran_for_the_method(lb):
    """Track B's grids start from Track A's (first) picks: each must be a rate the committed Track A
    sweep ran for that method (methods re-run under their authors' rules excepted: their Track A sweep
    started again), and every method of Track B needs one."""
    rows = (ROOT / "results" / "leaderboard" / "sweep.md").read_text(encoding="utf-8").splitlines()
    ran = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("method", "---"):
            ran[cells[0]] = {float(point.split(":")[0]) for point in cells[1].split(", ")}
    assert set(ran) - set(lb.NOT_IN_TRACK_B) == set(lb.TRACK_B_START)  # Track A rows not yet in Track B aside
    for method, rate in lb.TRACK_B_START.items():
        if method in lb.FIDELITY_RERUNS:  # its Track A sweep restarted under the authors' rules
            continue
        assert rate in ran[method], (method, rate, sorted(ran[method]))
    from lorabench.launch import CONF_DIR
    from lorabench.methods.catalog import load_presets

    assert set(load_presets(CONF_DIR / "method")) - set(lb.NOT_IN_TRACK_B) == set(lb.TRACK_B_START)  # all of B


def test_track_b_grid_starts_at_the_track_a_pick_and_two_ladder_steps_up(lb):
    assert lb.lr_grid("lora", lb.TRACK_B) == [5e-4, 2e-3]
    assert lb.lr_grid("full", lb.TRACK_B) == [5e-5, 2e-4]
    assert lb.lr_grid("svfit", lb.TRACK_B) == [1e-1, 5e-1]
    assert lb.lr_grid("lora") == [lb.DEFAULT_LR, 1e-3]  # Track A keeps its own grid
    rising = {5e-4: 0.40, 2e-3: 0.55}
    assert lb.sweep_grid("lora", rising, lb.TRACK_B) == [5e-4, 2e-3, 5e-3]  # edge extension as in Track A
    task_b = lb.overrides("badam", 2e-4, 0, Path("/tmp/x"), None, lb.TRACK_B)
    assert "method.switch_every=1" in task_b and "method.switch_every=42" not in task_b
    assert "method.scale=4" in lb.overrides("galore", 2e-4, 0, Path("/tmp/x"), None, lb.TRACK_B)


def test_budget_table_flags_a_budget_the_method_cannot_reach(lb, tmp_path):
    solved = {"knob": "rank", "value": 384, "predicted": 5390, "capped": True}
    capped = fake_record(tmp_path, "loldu", 2e-2, 0, 0.52, params=5390, method_report={"budget": solved})
    matched = {**solved, "value": 8, "predicted": lb.BUDGET, "capped": False}
    exact = fake_record(tmp_path, "lora", 5e-4, 0, 0.79, params=lb.BUDGET, method_report={"budget": matched})
    lines = lb.budget_table([capped, exact], [], {}).splitlines()
    assert "| loldu | rank=384 (its largest: the budget is out of reach) | 5,390 | 52.00 |" in lines[3]
    assert "| lora | rank=8 | 74,498 | 79.00 |" in lines[2]


def test_completed_runs_are_skipped_without_spawning_a_worker(lb, tmp_path, monkeypatch):
    task = lb.overrides("lora", 5e-4, 0, tmp_path, None)
    record = {"run_id": run_id(compose(task)), "status": "completed"}
    write_json_atomic(tmp_path / record["run_id"] / RECORD_NAME, record)

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started for a completed run")

    from lorabench.tuning import runs

    monkeypatch.setattr(runs.multiprocessing, "get_context", no_pool)  # run_all runs through lorabench.tuning
    assert lb.run_all([task], jobs=2) == []
    record["status"] = "failed"  # a failed run is run again
    write_json_atomic(tmp_path / record["run_id"] / RECORD_NAME, record)
    with pytest.raises(AssertionError, match="worker pool"):
        lb.run_all([task], jobs=2)


def test_track_b_optimizer_state_budget_is_the_smallest_round_size_all_four_meet(lb):
    """Every optimizer the budget sizes must fit OPT_BUDGET_MB_B on smollm2_135m at its smallest knob
    (else its budget run fails), and galore-torch's floor must be close below it (else the budget is
    not the tight common size). Built on the meta device: shapes only, no weights."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabench import budget

    config = LlamaConfig(  # SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, tied embeddings
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # the count the Track B records report
    ctx = SimpleNamespace(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    smallest = {"rank": 1, "density": 1e-3, "projector": "svd", "proj_type": "std"}
    floors = {
        name: formula(model, SimpleNamespace(**smallest), ctx) / 2**20
        for name, formula in budget.STATE_FORMULAS.items()
    }
    assert max(floors.values()) <= lb.OPT_BUDGET_MB_B, floors
    assert floors["galore_torch"] > 0.9 * lb.OPT_BUDGET_MB_B, floors
    assert lb.TRACK_B.optimizer_budget_mb == lb.OPT_BUDGET_MB_B


def test_sweep_table_says_when_a_grid_is_not_finished(lb, tmp_path):
    path = tmp_path / "sweep.md"
    lb.write_sweep_table(path, ["lora", "full"], {"lora": {5e-4: 0.79}, "full": {5e-5: 0.82, 1e-4: 0.81}})
    rows = path.read_text().splitlines()
    assert "| lora | 0.0005: 79.00, 0.001: - | 0.0005 (sweep not finished) |" in rows
    assert "| full | 3e-05: -, 5e-05: 82.00, 0.0001: 81.00 | 5e-05 (sweep not finished) |" in rows  # below: to run


def test_fidelity_table_compares_the_last_reported_superseded_row(lb, tmp_path):
    old, new = tmp_path / "superseded", tmp_path / "records"
    for seed, acc in enumerate([0.70, 0.72, 0.74]):
        fake_record(old, "badam", 2e-4, seed, acc)  # the row the leaderboard reported (n = 3)
    fake_record(old, "badam", 1e-4, 1, 0.9)  # a seed retired earlier at a replaced rate (n = 1)
    for seed, acc in enumerate([0.80, 0.81, 0.82]):
        fake_record(new, "badam", 5e-4, seed, acc)
    rows = {r["method"]: r for r in lb.leaderboard_rows(lb.completed(new))}
    lines = lb.fidelity_table(lb.completed(old), rows).splitlines()
    badam = next(line for line in lines if line.startswith("| badam "))
    assert badam == "| badam | 72.00 ± 2.00 (3) at 0.0002 | 81.00 ± 1.00 (3) at 0.0005 | +9.00 |"
    assert next(line for line in lines if line.startswith("| fira ")) == "| fira | - | - | - |"


def test_only_records_of_the_current_code_count_as_after(lb, tmp_path):
    old = fake_record(tmp_path, "fira", 1e-4, 0, 0.8)  # written before fidelity entries existed
    new = {**old, "run_id": "fira-new", "method": {**old["method"], "fidelity": {}}}
    assert lb.current_code_rows([old]) == {}
    assert lb.current_code_rows([old, new])["fira"]["n"] == 1
