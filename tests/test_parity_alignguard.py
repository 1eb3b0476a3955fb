"""AlignGuard-LoRA against tests/fixtures/parity/alignguard.json (written by scripts/parity/alignguard.py).

The authors' code holds no loss of the paper to compare with (the audit in the fixture); what is pinned
is a third party's reading of the paper (Sirhan1/modelFineTuneRiskAssessment): its Fisher directions of
one linear weight from per-sample gradients, its split of a fixed update, the four energies and their
gradients, and the collision terms on a free pair. Each comparison is also shown to reject the
mutations the rule could suffer (wrong Fisher power, swapped parts, wrong number of directions).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorabench.methods.fidelity import fidelity_of
from lorabench.methods.regularizers.alignguard import (
    AlignGuard,
    Directions,
    geodesic_energy,
    layer_energies,
    overlap_energy,
    per_sample_gradients,
    split,
    top_directions,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "alignguard.json").read_text())
S, CASES = FIXTURE["settings"], FIXTURE["cases"]
INPUTS = {k: torch.tensor(v, dtype=torch.float64) for k, v in CASES["inputs"].items() if k != "y"}
LABELS = torch.tensor(CASES["inputs"]["y"])


def _reference_directions() -> Directions:
    fisher = CASES["fisher"]
    return Directions(
        torch.tensor(fisher["eigenvectors"], dtype=torch.float64),
        torch.tensor(fisher["eigenvalues"], dtype=torch.float64),
        1.0,
    )


def test_the_authors_code_has_no_rule_to_compare_and_the_entry_says_so():
    audit = FIXTURE["authors_audit"]
    assert audit["model.py"]["compiles"].startswith("SyntaxError at line 319")
    assert all(not any(f["rule_words"].values()) for f in audit.values())  # no Fisher, eigen, geodesic, ...
    assert audit["model.py"]["other_words"]["silhouette"] and audit["model.py"]["other_words"]["null_space"]
    entry = fidelity_of(AlignGuard)
    assert entry.status == "rule" and FIXTURE["reference"]["authors"]["commit"][:12] in entry.reference
    assert FIXTURE["reference"]["third_party"]["commit"][:12] in entry.reference


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        weight = INPUTS["weight"]
        self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        self.lin.weight.data.copy_(weight)
        self.readout = INPUTS["readout"]

    def forward(self, x):
        return torch.tanh(self.lin(x)) @ self.readout.T


def _summed_ce(model, batch):
    logits = model(batch["x"])
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none").sum(dim=1)


def test_fisher_directions_equal_the_reference_from_per_sample_gradients():
    model = _Tiny()
    batches = [{"x": INPUTS["x"][:4], "y": LABELS[:4]}, {"x": INPUTS["x"][4:], "y": LABELS[4:]}]  # split: per sample
    grads = per_sample_gradients(model, {"lin": model.lin}, batches, _summed_ce)["lin"]
    ours, ref = top_directions(grads, S["top_k"]), _reference_directions()
    assert ours.basis.shape == ref.basis.shape  # exactly k directions
    torch.testing.assert_close(ours.eigenvalues.double(), ref.eigenvalues, rtol=1e-5, atol=0)
    cosines = torch.einsum("kij,kij->k", ours.basis.double(), ref.basis).abs()  # signs are arbitrary
    torch.testing.assert_close(cosines, torch.ones_like(cosines), rtol=0, atol=1e-5)
    assert model.lin.weight.grad is None  # the estimate leaves no gradient behind
    fewer = top_directions(grads, S["top_k"] - 1)
    assert fewer.basis.shape[0] == S["top_k"] - 1 and not torch.allclose(
        fewer.eigenvalues.sum(), ours.eigenvalues.sum()
    )


def test_split_energies_and_gradients_equal_the_reference():
    directions = _reference_directions()
    delta = INPUTS["delta"].clone().requires_grad_(True)
    _, aligned, task = split(delta, directions)
    torch.testing.assert_close(aligned, torch.tensor(CASES["split"]["aligned"], dtype=torch.float64))
    torch.testing.assert_close(task, torch.tensor(CASES["split"]["task"], dtype=torch.float64))
    energies = layer_energies(delta, directions, S["beta"], S["tau"])
    for name, expected in CASES["terms"].items():
        value = energies[name]
        assert value.item() == pytest.approx(expected["value"], rel=1e-10, abs=1e-20), name
        (grad,) = torch.autograd.grad(value, delta, retain_graph=True)
        torch.testing.assert_close(
            grad, torch.tensor(expected["grad_delta"], dtype=torch.float64), atol=1e-12, rtol=1e-9
        )


def test_the_reference_numbers_reject_a_wrong_power_swapped_parts_and_a_wrong_k():
    directions, delta = _reference_directions(), INPUTS["delta"]
    coords, aligned, task = split(delta, directions)
    align, task_value = CASES["terms"]["align"]["value"], CASES["terms"]["task"]["value"]
    for power in (0.5, 2.0):  # ||F^{p/2} dW_A||^2
        assert (directions.eigenvalues**power * coords**2).sum().item() != pytest.approx(align, rel=1e-3)
    assert aligned.square().sum().item() != pytest.approx(task_value, rel=1e-3)  # dW_A in the task term
    assert (directions.eigenvalues * torch.einsum("kij,ij->k", directions.basis, task) ** 2).sum().item() < 1e-20
    fewer = Directions(directions.basis[:-1], directions.eigenvalues[:-1], 1.0)
    assert layer_energies(delta, fewer, S["beta"], S["tau"])["align"].item() != pytest.approx(align, rel=1e-3)


def test_collision_terms_on_a_free_pair_equal_the_reference():
    a = INPUTS["free_a"].clone().requires_grad_(True)
    t = INPUTS["free_t"].clone().requires_grad_(True)
    for name, value in (("overlap", overlap_energy(a, t, S["beta"], S["tau"])), ("geodesic", geodesic_energy(a, t))):
        expected = CASES["free_pair"][name]
        assert value.item() == pytest.approx(expected["value"], rel=1e-10)
        ga, gt = torch.autograd.grad(value, (a, t))
        torch.testing.assert_close(ga, torch.tensor(expected["grad_a"], dtype=torch.float64), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gt, torch.tensor(expected["grad_t"], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert CASES["free_pair"]["geodesic"]["value"] > 0.1  # the free pair is not orthogonal: the term is live
