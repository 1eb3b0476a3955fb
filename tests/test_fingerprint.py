"""Portable records (lorabench/fingerprint.py): run ids hash local folders by content, records hold
no paths of the machine that made them, and the one-off rewrite of earlier records
(scripts/portable_records.py) gives them the ids today's code computes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from lorabench.config_store import compose
from lorabench.fingerprint import (
    SITE_PACKAGES,
    folder_fingerprint,
    location_identity,
    portable_path,
    portable_strings,
)
from lorabench.results.record import config_hash, run_id, write_json_atomic
from tests.conftest import tiny_overrides, write_sst2

ROOT = Path(__file__).resolve().parent.parent


def _config(data_dir: Path, results_dir: Path) -> dict:
    return compose(tiny_overrides("classification", data_dir, results_dir))


def test_the_same_data_at_two_paths_has_one_run_id_and_other_data_another(tmp_path):
    a = write_sst2(tmp_path / "a" / "SST-2")
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    (b / ".DS_Store").write_text("finder noise")  # hidden files are not data
    other = write_sst2(tmp_path / "other" / "SST-2", seed=1)
    ids = [run_id(_config(d, tmp_path / "runs")) for d in (a, b, other)]
    assert ids[0] == ids[1] and ids[2] != ids[0]
    (b / "dev.tsv").write_text((b / "dev.tsv").read_text() + "one more\t1\n")  # one changed byte range
    assert run_id(_config(b, tmp_path / "runs")) != ids[0]


def test_fingerprint_names_files_so_a_rename_changes_it(tmp_path):
    folder = write_sst2(tmp_path / "SST-2")
    before = folder_fingerprint(folder)
    assert before["files"] == 2 and len(before["sha256"]) == 64
    (folder / "dev.tsv").rename(folder / "test.tsv")
    assert folder_fingerprint(folder)["sha256"] != before["sha256"]


def test_a_missing_dataset_path_keeps_its_string_and_a_hub_id_stays_a_hub_id(tmp_path):
    assert location_identity("dataset", str(tmp_path / "nope")) == f"missing:{tmp_path / 'nope'}"
    assert location_identity("model", "HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert location_identity("dataset", None) is None


def test_portable_paths(tmp_path):
    project = tmp_path / "work" / "main"
    (project / "results").mkdir(parents=True)
    site = Path(sys.modules["pytest"].__file__).resolve().parent  # a package inside site-packages
    assert portable_path(str(project / "results" / "x"), cwd=project) == "results/x"
    assert portable_path(str(tmp_path / "work" / "shared" / "d"), cwd=project) == "../shared/d"
    assert portable_path(str(site), cwd=project) == f"{SITE_PACKAGES}/{site.name}"
    assert portable_path("/opt/far/away", cwd=project) == "/opt/far/away"  # neither: as given
    assert portable_path("relative/as/given", cwd=project) == "relative/as/given"
    assert portable_path("HuggingFaceTB/SmolLM2-135M-Instruct", cwd=project) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg = {
        "dataset": {"data_dir": str(project / "d")},
        "model": {"name_or_path": "org/hub"},
        "results_dir": str(project),
    }
    assert portable_strings(cfg, cwd=project) == {
        "dataset": {"data_dir": "d"},
        "model": {"name_or_path": "org/hub"},
        "results_dir": ".",
    }


def test_a_run_record_holds_no_path_of_the_machine(tmp_path, monkeypatch):
    """Data and results under the working directory: the record, its .hydra files and its inputs
    name them relative to it, and the run id is the content-based one."""
    from lorabench.cli import main

    monkeypatch.chdir(tmp_path)
    data = write_sst2(tmp_path / "data" / "SST-2")
    overrides = tiny_overrides("classification", data.resolve(), (tmp_path / "runs").resolve())
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    assert exc.value.code == 0
    (folder,) = (tmp_path / "runs").iterdir()
    texts = [(folder / name).read_text() for name in ("record.json", ".hydra/config.yaml", ".hydra/overrides.yaml")]
    record = json.loads(texts[0])
    assert folder.name == record["run_id"] == run_id(compose(overrides))
    assert record["config"]["dataset"]["data_dir"] == "data/SST-2" and record["config"]["results_dir"] == "runs"
    assert record["dataset"]["source"]["path"] == "data/SST-2"
    assert record["inputs"] == {"dataset.data_dir": {"path": "data/SST-2", **folder_fingerprint(data)}}
    assert all(str(tmp_path) not in text for text in texts)


def _migration_script():
    spec = importlib.util.spec_from_file_location("portable_records", ROOT / "scripts" / "portable_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_record_rewrite_gives_the_ids_of_todays_code_and_portable_paths(tmp_path):
    """A record as earlier code wrote it (path-hashed id, absolute paths, budget-solved size in the
    config) is rewritten to the id today's code computes for its config, with no machine path."""
    machine = tmp_path / "work" / "main"
    data = write_sst2(tmp_path / "work" / "shared" / "SST-2")
    results = machine / "results" / "lb"
    overrides = tiny_overrides("classification", data, results)
    plain = compose(overrides)
    budget = compose([*overrides, "budget.trainable_params=5000"])
    old = []
    for config, solved in ((plain, None), (budget, 3)):
        legacy = config_hash(config, by_content=False)
        rid = f"{config['method']['label']}-sst2-tiny_bert-s0-{legacy[:10]}"
        stored = json.loads(json.dumps(config))
        report = {}
        if solved:
            stored["method"]["rank"] = solved  # what a budget run stores
            report = {"budget": {"knob": "rank", "value": solved}}
        record = {
            "run_id": rid,
            "config_hash": legacy,
            "config": stored,
            "command": "lorabench train " + " ".join(overrides + (["budget.trainable_params=5000"] if solved else [])),
            "method_report": report,
            "dataset": {"source": {"kind": "local", "path": str(data)}},
            "model": {"source": {"path": "/v/lib/python3.11/site-packages/pkg/model"}},
        }
        write_json_atomic(results / rid / "record.json", record)
        old.append(rid)
    script = _migration_script()
    results_of = [script.migrate(results / rid / "record.json", machine) for rid in old]
    assert [r[0] for r in results_of] == old
    assert [r[1] for r in results_of] == [run_id(plain), run_id(budget)]
    for new in (r[1] for r in results_of):
        text = (results / new / "record.json").read_text()
        assert str(tmp_path) not in text and "/v/lib" not in text
        record = json.loads(text)
        assert record["config"]["dataset"]["data_dir"] == "../shared/SST-2"
        assert record["model"]["source"]["path"] == f"{SITE_PACKAGES}/pkg/model"
        assert record["inputs"]["dataset.data_dir"]["sha256"] == folder_fingerprint(data)["sha256"]
    assert not any((results / rid).exists() for rid in old)


def test_every_string_of_a_written_record_is_portable(tmp_path, monkeypatch):
    """The record writer rewrites machine folders anywhere in the record (a traceback, a cache path
    in a method report), not only the config keys it knows."""
    from lorabench.fingerprint import portable_text
    from lorabench.results.runs import Recorder

    project, cache = tmp_path / "proj", tmp_path / "cache"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("LORABENCH_CACHE", str(cache))
    record = {
        "error": {"traceback": f'File "{project}/lorabench/train.py", line 3'},
        "method_report": {"cache": {"path": f"{cache}/lora_ga/k.safetensors"}},
        "results_dir": str(project),
        "neighbour": f"{tmp_path}/shared/data ok",
        "elsewhere": "/opt/models/x",
        "lookalike": f"{project}ly/x",
    }
    expected = {
        "error": {"traceback": 'File "lorabench/train.py", line 3'},
        "method_report": {"cache": {"path": "<lorabench-cache>/lora_ga/k.safetensors"}},
        "results_dir": ".",
        "neighbour": "../shared/data ok",
        "elsewhere": "/opt/models/x",
        "lookalike": "../projly/x",
    }
    assert portable_strings(record) == expected
    assert portable_text(f"{tmp_path}/x", everywhere=True).startswith(("<tmp>/", "../"))
    recorder = Recorder(project / "r" / "record.json", dict(record), True)
    recorder.write()
    assert {k: v for k, v in json.loads((project / "r" / "record.json").read_text()).items() if k in record} == expected
    assert recorder.record["results_dir"] == str(project)  # the live record keeps the real paths
