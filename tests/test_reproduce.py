"""Paper recipes: every recipe loads and every grid point composes and validates; only verified
numbers are shown as the paper's; one recipe runs end to end at scale=smoke on CPU."""

from __future__ import annotations

import pytest

from lorabench import cli, validate
from lorabench.errors import ConfigError
from lorabench.reproduce import grid_points, is_verified, list_recipes, load_recipe, paper_entries, run_recipe
from lorabench.results.table import build_table
from tests.conftest import compose
from tests.test_comparison import rec

EXPECTED = {"galore_glue_roberta", "lora_ga_pro", "lora_e2e_gpt2m", "peft_metamathqa_llama3"}
STATUSES = {"verified-paper", "verified-authors", "unverified"}


def test_expected_recipes_exist():
    assert EXPECTED <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_and_grid_composes(name, monkeypatch, tmp_path):
    monkeypatch.setattr(validate, "_check_device", lambda cfg: None)  # full scale asks for a GPU
    recipe = load_recipe(name)
    assert {"full", "smoke"} <= set(recipe["scales"])
    assert {"seeds", "report", "split"} <= set(recipe["protocol"]) and recipe["protocol"]["report"] in ("best", "last")
    assert float(recipe["tolerance"]) > 0
    for entry in recipe["paper_numbers"]:
        assert entry["status"] in STATUSES, entry
    for scale in ("full", "smoke"):
        points = grid_points(recipe, scale, data_root=str(tmp_path), results_dir=str(tmp_path))
        grid = recipe["scales"][scale]["grid"]
        assert len(points) == len(grid["variants"]) * len(grid["datasets"]) * len(grid["seeds"])
        # validate enough points that every variant and every dataset is composed at least once
        variants, datasets = list(grid["variants"]), list(grid["datasets"])
        wanted = {
            f"{variants[i % len(variants)]}/{datasets[i % len(datasets)]}"
            for i in range(max(len(variants), len(datasets)))
        }
        for point, overrides in points:
            key = point.rsplit("/", 1)[0]
            if key not in wanted:
                continue
            wanted.discard(key)
            cfg_dict = compose(overrides)
            cfg, spec = validate.build_run(cfg_dict)
            assert cfg.results_dir == str(tmp_path / name)
            if scale == "smoke":  # smoke scale is tiny and never the paper's model
                assert cfg.model.name.startswith("tiny_") and cfg.train.max_steps <= 4
                assert cfg.model.name not in {e["model"] for e in recipe["paper_numbers"]}


def test_only_verified_numbers_are_the_papers():
    for name in EXPECTED:
        recipe = load_recipe(name)
        shown = paper_entries(recipe)
        assert all(is_verified(e) for e in shown)
        marked = paper_entries(recipe, include_unverified=True)
        assert all(is_verified(e) or "second-hand" in e["table"] for e in marked)
    assert not paper_entries(load_recipe("galore_glue_roberta"))  # all of GaLore's Table 4 is second-hand
    assert len(paper_entries(load_recipe("peft_metamathqa_llama3"))) == 8


def test_data_root_is_required_where_a_recipe_reads_local_data():
    with pytest.raises(ConfigError, match="data_root=DIR"):
        grid_points(load_recipe("galore_glue_roberta"), "smoke")
    with pytest.raises(ConfigError, match="no scale 'huge'"):
        grid_points(load_recipe("galore_glue_roberta"), "huge")


def test_paper_numbers_beside_full_scale_records(tmp_path):
    recipe = load_recipe("peft_metamathqa_llama3")
    for label, rank, acc in (("lora", 32, 0.47), ("rslora", 64, 0.52)):
        rec(tmp_path, label, 0, acc, rank=rank, model="llama3_2_3b", dataset="metamathqa")
    text = build_table(tmp_path, paper=paper_entries(recipe))[0]
    lora = next(r for r in text.splitlines() if r.startswith("| lora"))
    assert "47.84 [peft results/lora--llama-3.2-3B-rank32.json]" in lora and "-0.84" in lora
    rslora = next(r for r in text.splitlines() if r.startswith("| rslora"))
    assert "51.33" in rslora and "+0.67" in rslora


def test_reproduce_smoke_end_to_end(sst2_dir, tmp_path, capsys):
    code = run_recipe("galore_glue_roberta", "smoke", data_root=str(sst2_dir.parent), results_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert code == 0, out
    records = sorted(p.parent.name for p in (tmp_path / "galore_glue_roberta").rglob("record.json"))
    assert len(records) == 2 and records[0].startswith("galore-sst2-tiny_bert-s0")
    assert "| galore | tiny_bert |" in out and "| lora | tiny_bert |" in out
    assert "paper numbers are not shown" in out and "paper |" not in out


def test_reproduce_cli_list_and_dry_run(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--list"])
    assert exc.value.code == 0 and "peft_metamathqa_llama3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "peft_metamathqa_llama3", "--dry-run", "hardware.micro_batch_size=2"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "8 runs" in out and out.count("hardware.micro_batch_size=2") == 8
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "nope"])
    assert exc.value.code == 2 and "unknown recipe 'nope'" in capsys.readouterr().err
