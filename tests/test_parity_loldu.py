"""LoLDU (adapter ``loldu``) against numbers pinned by running the authors' code.

The fixture comes from scripts/parity/loldu.py: SKDDJ/LoLDU@4fe87a05a668's ``LoLDUParametrization``
(pivoted LDU of W0, residual weight, sigma = 1 / rank, only ``vector_z`` trained as its README does)
on one pretrained linear layer, trained with torch.optim.AdamW on seeded inputs and upstream gradients
(tests/parity_one_linear.py). Here our preset runs the same case through ``apply_method`` from its own
init (the LU factorisation is deterministic, so no tensor is loaded). Compared: the outputs and the
gradient of the diagonal at every step, the diagonal after the last step and a float64 checksum after
every step, at 1e-6 relative to max(1, |reference|) (fp32, CPU: the reference folds the initial product
into a residual weight, ours adds the update to W0, which leaves rounding-level differences).
"""

from __future__ import annotations

import pytest
import torch

from lorabench.methods.adapters.svfit import DiagLayer
from tests.parity_case import load_fixture
from tests.parity_one_linear import build_ours, gap, plain, run, worst_gap

TOL = 1e-6
CASES = ["reference_defaults", "preset", "rank4"]


def run_ours(case: dict, **overrides) -> dict:
    built, _, _ = build_ours("loldu", case, overrides)
    layer = built.model.lin
    assert isinstance(layer, DiagLayer) and layer.diag.numel() == case["rank"]
    assert layer.scalar is None and layer.fixed_scalar == pytest.approx(case["sigma"])
    assert gap(plain(layer.diag), case["init"]["diag"]) <= TOL  # z starts at D_r, as theirs
    return run(built.model, {"diag": layer.diag}, built.optimizer, case)


@pytest.mark.parametrize("name", CASES)
def test_loldu_matches_the_authors_parametrization(name):
    case = load_fixture("loldu")["cases"][name]
    gaps = worst_gap(run_ours(case), case)
    assert max(gaps.values()) <= TOL, gaps


def test_a_unit_scale_misses_the_fixture():
    """sigma = 1 (the scale this adapter used before) is not the authors' 1 / rank."""
    case = load_fixture("loldu")["cases"]["reference_defaults"]
    built, _, _ = build_ours("loldu", case, {"alpha": float(case["rank"])})
    layer = built.model.lin
    gaps = worst_gap(run(built.model, {"diag": layer.diag}, built.optimizer, case), case)
    assert gaps["grads"] > 1e-3, gaps


def test_the_fixture_holds_its_cases():
    fixture = load_fixture("loldu")
    assert sorted(fixture["cases"]) == sorted(CASES) and fixture["produced_by"] == "scripts/parity/loldu.py"
    assert all(case["steps"] >= 10 for case in fixture["cases"].values())
    assert torch.tensor(fixture["cases"]["reference_defaults"]["final"]["diag"]).numel() == 8  # every pivot
