"""The rows of ``lorabench methods``: every preset in conf/method, resolved through the registries."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

import lorabench.methods  # noqa: F401  registers components
from lorabench.budget import describe_knob
from lorabench.errors import ConfigError
from lorabench.methods.spec import resolve_method


def load_presets(method_dir: Path) -> dict[str, dict]:
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p), resolve=True) for p in sorted(method_dir.glob("*.yaml"))}


def method_rows(method_dir: Path) -> list[tuple[str, ...]]:
    rows = []
    for name, raw in load_presets(method_dir).items():
        try:
            spec = resolve_method(raw)
        except ConfigError as exc:  # e.g. a 4-bit preset on a machine without CUDA
            rows.append(
                (name, str(raw.get("family", "")), "-", "-", f"unavailable here: {exc}", str(raw.get("paper", "")))
            )
            continue
        parts = "+".join(f"{axis}:{n}" for axis, n in spec.names.items() if n != "none")
        rows.append((name, spec.family, spec.backed_by(), describe_knob(spec), parts, spec.paper))
    return rows


STRATEGY_MATRIX = Path(__file__).resolve().parents[2] / "results" / "strategies" / "matrix.json"


def strategy_rows(method_dir: Path, matrix: Path = STRATEGY_MATRIX) -> list[tuple[str, ...]]:
    """One row per preset: can it run under each ``hardware.strategy`` (what its components declare,
    lorabench.method_params: ``sharding``), and what the committed two-process check
    (``scripts/strategy_matrix.py``, results/strategies/) measured for it."""
    from lorabench.distributed import STRATEGIES
    from lorabench.method_params.check import check_method, strategy_conflicts

    measured = json.loads(matrix.read_text())["presets"] if matrix.exists() else {}
    rows = []
    for name, raw in load_presets(method_dir).items():
        try:
            method = check_method(dict(raw))
        except ConfigError as exc:  # a preset that needs run-time input (X-LoRA's experts)
            rows.append((name, *("-" for _ in STRATEGIES), "not run", f"unavailable as a preset: {exc}"))
            continue
        conflicts = {s: strategy_conflicts(method, s) for s in STRATEGIES}
        cells = ["no" if conflicts[s] else "yes" for s in STRATEGIES]
        checked = measured.get(name, {})
        check = ", ".join(f"{s}: {checked[s]['verdict']}" for s in STRATEGIES if s in checked) or "not run"
        why = "; ".join(f"{s}: {'; '.join(c)}" for s, c in conflicts.items() if c)
        rows.append((name, *cells, check, why))
    return rows


def fidelity_rows(method_dir: Path) -> list[tuple[str, ...]]:
    """One row per (preset, component): status, reference, tolerance and deviations."""
    rows = []
    for name, raw in load_presets(method_dir).items():
        try:
            spec = resolve_method(raw)
        except ConfigError as exc:
            rows.append((name, "-", "unavailable", "-", "", f"unavailable here: {exc}"))
            continue
        for axis, entry in spec.fidelity().items():
            notes = "; ".join([*entry["deviations"], *(f"unchecked: {u}" for u in entry["unchecked"])])
            component = f"{axis}:{spec.names[axis]}"
            rows.append((name, component, entry["status"], entry["reference"], entry["tolerance"], notes))
    return rows
