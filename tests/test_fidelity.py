"""Fidelity entries (lorabench/methods/fidelity.py): every component declares how far it is known to
agree with its authors' code, ``lorabench methods --fidelity`` shows it, records carry it, and every
entry that claims parity points at a fixture produced by the reference and a test that reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lorabench.methods  # noqa: F401  registers components
from lorabench.methods.fidelity import STATUSES, UNCHECKED, Fidelity, fidelity_of
from lorabench.registry import ADAPTERS, INITIALIZERS, OPTIMIZERS, PROCEDURES

ROOT = Path(__file__).resolve().parents[1]
AXES = {"adapter": ADAPTERS, "init": INITIALIZERS, "optimizer": OPTIMIZERS, "procedure": PROCEDURES}
ALL = [(axis, name, cls) for axis, reg in AXES.items() for name, cls in reg.items()]


def test_bad_status_and_parity_without_fixture_are_refused():
    with pytest.raises(ValueError, match="'exact'.*valid choices: parity, library, rule, unchecked"):
        Fidelity(reference="x", status="exact")
    with pytest.raises(ValueError, match="needs a fixture and a tolerance"):
        Fidelity(reference="x", status="parity", tolerance="1e-6")


def test_library_backed_components_default_to_their_library():
    entry = fidelity_of(ADAPTERS.get("lora"))
    assert entry.status == "library" and entry.reference.startswith("peft==")
    assert fidelity_of(object()) is UNCHECKED


@pytest.mark.parametrize("axis,name,cls", ALL, ids=[f"{a}:{n}" for a, n, _ in ALL])
def test_parity_entries_name_a_pinned_fixture_and_a_test(axis, name, cls):
    entry = fidelity_of(cls)
    assert entry.status in STATUSES
    if entry.status != "parity":
        return
    fixture = ROOT / entry.fixture
    assert fixture.is_file(), f"{axis} {name}: fixture {entry.fixture} is missing"
    data = json.loads(fixture.read_text())
    assert data["reference"] and data["version"] and data["cases"], f"{entry.fixture} lacks reference/version/cases"
    script = ROOT / data["produced_by"]
    assert script.is_file() and script.parent.name == "parity", f"{entry.fixture}: {data['produced_by']} missing"
    readers = [t for t in (ROOT / "tests").glob("test_parity*.py") if fixture.stem in t.read_text()]
    assert readers, f"no tests/test_parity*.py reads {entry.fixture}"
    assert "/tmp/" not in fixture.read_text() and "/work/" not in fixture.read_text(), "absolute path in a fixture"


OPTIMIZER_SIDE = [(a, n, c) for a, n, c in ALL if a in ("optimizer", "procedure")]


@pytest.mark.parametrize("axis,name,cls", OPTIMIZER_SIDE, ids=[f"{a}:{n}" for a, n, _ in OPTIMIZER_SIDE])
def test_every_optimizer_and_procedure_declares_its_entry(axis, name, cls):
    """Optimizers and procedures say explicitly where they stand (none falls back to 'unchecked')."""
    assert fidelity_of(cls) is not UNCHECKED, f"{axis} {name} declares no fidelity entry"


def test_methods_fidelity_lists_every_component(capsys):
    from lorabench.cli import main
    from lorabench.launch import CONF_DIR

    with pytest.raises(SystemExit) as exc:
        main(["methods", "--fidelity"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["preset", "component", "status"]
    presets = {line.split()[0] for line in lines[1:]}
    assert presets == {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    lora_rows = [line.split()[1:3] for line in lines if line.startswith("lora ")]
    assert ["adapter:lora", "library"] in lora_rows and ["optimizer:adamw", "library"] in lora_rows


def test_record_carries_the_fidelity_of_each_component():
    from lorabench.methods.spec import resolve_method

    spec = resolve_method({"label": "lora", "adapter": "lora", "optimizer": "adamw"})
    described = spec.describe()["fidelity"]
    assert set(described) == {"adapter", "optimizer"}
    assert described["optimizer"]["reference"].startswith("torch==") and described["optimizer"]["status"] == "library"
    json.dumps(described)  # plain JSON for the record


def test_a_revised_component_gets_new_run_ids_and_others_keep_theirs(monkeypatch):
    """Raising a component's revision changes the run id of configs that use it, and only those,
    so a sweep never mistakes a run of the old code for a finished run of the new one."""
    from dataclasses import replace

    from lorabench.results.record import run_id

    lora_cfg = {"method": {"label": "lora", "adapter": "lora", "optimizer": "adamw"}, "dataset": {"name": "d"}}
    lora_cfg.update(model={"name": "m"}, seed=0)
    galore_cfg = {**lora_cfg, "method": {"label": "galore", "adapter": "none", "optimizer": "galore"}}
    before = run_id(lora_cfg), run_id(galore_cfg)
    galore = OPTIMIZERS.get("galore")
    monkeypatch.setattr(galore, "fidelity", replace(fidelity_of(galore), revision=7), raising=False)
    assert run_id(lora_cfg) == before[0]
    assert run_id(galore_cfg) != before[1]
    with pytest.raises(ValueError, match="revision 0 is invalid"):
        Fidelity(reference="x", status="rule", revision=0)
