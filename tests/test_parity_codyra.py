"""CoDyRA (adapter ``codyra`` with procedure ``codyra``) against numbers pinned by running the authors' code.

The fixture comes from scripts/parity/codyra.py: Artificer-AI-Lab/CoDyRA@c1691e4c4c8a's ``codyra_Linear``
and the optimizer, cosine schedule and gate threshold of its ``train_model`` (executed as written), on
the shared case of tests/parity_adapter_case.py (two seeded linear layers, 24 x 20 and 20 x 24, a seeded
regression loss). Here our preset (with each case's overrides) is applied through ``apply_method`` to
the same linears, starts from the reference's A and gate draws, and runs the training loop's order:
forward, backward, ``after_backward``, ``optimizer.step()``, the run's scheduler (transformers' cosine,
no warm-up), ``zero_grad``, ``on_step_end``. Compared: the outputs and the gradients of the first step
and the final A, B, g (1e-6 absolute, fp32 on CPU), the threshold and the learning rate of every step
(1e-12), a float64 checksum of every factor after every step (1e-5: sums of up to 480 entries), which
gates are exactly 0 after every step and at the end (exactly), the outputs at a probe input after
training, and ``merge()`` against the authors' ``increment_task`` merge into W0. Two changes of the
rule (thresholding from iteration D instead of after it; the paper-style soft threshold that keeps
|g| - tau) each miss the fixture.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import get_scheduler

from lorabench.methods.adapters.codyra import CodyraLayer
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method
from lorabench.methods.catalog import load_presets
from lorabench.methods.procedures import codyra as procedure_module
from lorabench.methods.spec import resolve_method
from tests.conftest import CONF_DIR
from tests.parity_adapter_case import base_linears, batches, factor_checksum, max_nested_diff, rounded
from tests.parity_case import load_fixture

TOL, CHECKSUM_TOL, SCHEDULE_TOL = 1e-6, 1e-5, 1e-12
FIXTURE = load_fixture("codyra")
CASES = sorted(FIXTURE["cases"])
SHAPES = [tuple(s) for s in FIXTURE["shapes"]]
NAMES = [f"layer{i}" for i in range(len(SHAPES))]
PRESET = load_presets(CONF_DIR / "method")["codyra"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def factors(layer: CodyraLayer) -> dict:
    return {"A": layer.lora_A, "B": layer.lora_B, "gate": layer.gate}


def build(case: dict):
    s = case["settings"]
    overrides = {k: s[k] for k in ("rank", "max_kappa", "lambda_num", "dense_fraction")}
    spec = resolve_method({**PRESET, **overrides})
    model = nn.ModuleDict(dict(zip(NAMES, base_linears(SHAPES))))
    ctx = MethodContext(NAMES, "causal_lm", s["lr"], 0.0, s["steps"], 0)
    built = apply_method(model, spec, ctx)
    layers = [built.model[n] for n in NAMES]
    with torch.no_grad():  # the reference's draws (ours come from another generator)
        for layer, init in zip(layers, case["init"]):
            assert isinstance(layer, CodyraLayer) and not layer.lora_B.any()
            layer.lora_A.copy_(torch.tensor(init["A"]))
            layer.gate.copy_(torch.tensor(init["gate"]))
    return built, layers


def run_ours(case: dict) -> tuple[dict, list[CodyraLayer]]:
    s = case["settings"]
    built, layers = build(case)
    optimizer, procedure = built.optimizer, built.procedure
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=s["steps"])
    out = {"thresholds": [], "lrs": [], "zero_gates": [], "trajectory": []}
    for step, data in enumerate(batches(SHAPES, s["steps"])):
        outs = [layer(x) for layer, (x, _) in zip(layers, data)]
        sum(0.5 * ((y - target) ** 2).mean() for y, (_, target) in zip(outs, data)).backward()
        if step == 0:
            out["out0"] = [rounded(y) for y in outs]
            out["grad0"] = [{k: rounded(v.grad) for k, v in factors(m).items()} for m in layers]
        procedure.after_backward(step)
        out["lrs"].append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        procedure.on_step_end(step + 1)
        out["thresholds"].append(procedure.current_threshold)
        out["zero_gates"].append(sum(int((m.gate == 0).sum()) for m in layers))
        out["trajectory"].append(factor_checksum([factors(m) for m in layers]))
    out["final"] = [{k: rounded(v) for k, v in factors(m).items()} for m in layers]
    out["zero_ranks"] = [torch.nonzero(m.gate == 0).view(-1).tolist() for m in layers]
    return out, layers


def gaps(ours: dict, case: dict) -> dict[str, float]:
    found = {k: max_nested_diff(ours[k], case[k]) for k in ("final", "trajectory", "thresholds", "lrs")}
    for key in ("out0", "grad0"):
        if key in case:
            found[key] = max_nested_diff(ours[key], case[key])
    return found


@pytest.mark.parametrize("name", CASES)
def test_matches_the_authors_layer_and_threshold(name):
    case = FIXTURE["cases"][name]
    ours, layers = run_ours(case)
    found = gaps(ours, case)
    assert found["final"] <= TOL and found.get("out0", 0) <= TOL and found.get("grad0", 0) <= TOL, found
    assert found["trajectory"] <= CHECKSUM_TOL, found
    assert found["thresholds"] <= SCHEDULE_TOL and found["lrs"] <= SCHEDULE_TOL, found
    assert ours["zero_gates"] == case["zero_gates"] and ours["zero_ranks"] == case["zero_ranks"]
    assert [m.active_rank() for m in layers] == [case["settings"]["rank"] - len(z) for z in case["zero_ranks"]]
    if "probe_output" in case:
        gen = torch.Generator().manual_seed(FIXTURE["probe_seed"])
        probe = [torch.randn(3, d_in, generator=gen) for _, d_in in SHAPES]
        with torch.no_grad():
            outputs = [rounded(m(x)) for m, x in zip(layers, probe)]
        assert max_nested_diff(outputs, case["probe_output"]) <= TOL
    if "merged_weight" in case:  # their increment_task adds (B * g) A to W0
        with torch.no_grad():
            for layer, merged in zip(layers, case["merged_weight"]):
                layer.merge()
                assert max_nested_diff(rounded(layer.base.weight), merged) <= TOL


def test_the_schedule_is_the_authors_in_every_case():
    """D, L and the threshold per step (the closed form of their loop's counter)."""
    for name, case in FIXTURE["cases"].items():
        s = case["settings"]
        params = resolve_method({**PRESET, **{k: s[k] for k in ("max_kappa", "lambda_num", "dense_fraction")}})
        schedule = procedure_module.ThresholdSchedule(s["steps"], params.params["procedure"])
        assert (schedule.dense, schedule.every) == (case["dense_iters"], case["lambda_step_iters"]), name
        assert [schedule.threshold(i) for i in range(s["steps"])] == pytest.approx(case["thresholds"], abs=1e-15)
    assert FIXTURE["cases"]["short_run"]["lambda_step_iters"] == 0 and not any(
        FIXTURE["cases"]["short_run"]["zero_gates"]
    )


def test_thresholding_from_iteration_d_misses_the_fixture(monkeypatch):
    """The authors threshold after iterations i > D (strictly); from i >= D the gates move one step early."""
    monkeypatch.setattr(procedure_module.ThresholdSchedule, "prunes", lambda self, i: i >= self.dense)
    case = FIXTURE["cases"]["fast"]
    found = gaps(run_ours(case)[0], case)
    assert found["trajectory"] > 1e-2 and found["final"] > 1e-3, found


def test_the_soft_threshold_misses_the_fixture(monkeypatch):
    """sign(g) max(|g| - tau, 0) (the textbook proximal step) keeps |g| - tau where the authors' three
    statements zero every entry left below tau after the shift."""

    def soft(g: torch.Tensor, tau: float) -> None:
        g.copy_(torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0))

    monkeypatch.setattr(procedure_module, "sparse_threshold_", soft)
    case = FIXTURE["cases"]["no_dense"]
    ours, _ = run_ours(case)
    assert ours["zero_gates"] != case["zero_gates"] and gaps(ours, case)["final"] > 1e-2


def test_the_fixture_holds_its_cases():
    assert FIXTURE["version"] == "c1691e4c4c8a" and FIXTURE["produced_by"] == "scripts/parity/codyra.py"
    assert FIXTURE["commit"].startswith(FIXTURE["version"])
    preset = FIXTURE["cases"]["preset"]["settings"]
    assert {k: preset[k] for k in ("rank", "max_kappa", "lambda_num", "dense_fraction")} == {
        k: PRESET[k] for k in ("rank", "max_kappa", "lambda_num", "dense_fraction")
    }
    for case in FIXTURE["cases"].values():
        assert case["settings"]["steps"] >= 10 and len(case["trajectory"]) == case["settings"]["steps"]
    assert sum(len(z) for c in FIXTURE["cases"].values() for z in c["zero_ranks"]) > 0  # ranks do end at 0
