"""Flexora (procedure ``flexora``) against numbers pinned by running the authors' code.

The fixture comes from scripts/parity/flexora.py: kithib/Flexora@4449be816683's ``BlockOptimizer``
(src/llamafactory/train/flora.py: layer gates L softmax(alpha) on every LoRA module's inputs, AdamW on
fresh state every step, a hyper step of Adam on alpha over 8 cycled validation batches after every
step, ``selected_layer``: alpha > 0) on a 4-layer GQA Llama with peft LoRA on q_proj and v_proj
(tests/parity_flexora_case.py). Here our preset, set to the case, runs ``setup`` on the same model,
LoRA init and batches (the case's training share, then its validation share, as the calibration
batches). Compared: alpha after every step, the LoRA factors when the search ends (captured before the
restart restores them), the selected layers; then what the fine-tuning stage starts from.
"""

from __future__ import annotations

import collections

import pytest
import torch
from omegaconf import OmegaConf

import lorabench.methods.procedures.flexora as flexora
from lorabench.methods.base import MethodContext
from lorabench.methods.spec import resolve_method
from tests.conftest import CONF_DIR
from tests.parity_case import load_fixture
from tests.parity_flexora_case import LORA, lora_tensors, tiny_llama, token_batches

ALPHA_TOL, LORA_TOL = 1e-6, 1e-5
CASES = ["authors", "odd_cycle"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(case: dict, **overrides):
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "flexora.yaml"))
    n = case["train"] + case["val"]
    raw = {
        **preset,
        "rank": LORA["r"],
        "alpha": float(LORA["lora_alpha"]),
        "dropout": LORA["lora_dropout"],
        "flexora_val_fraction": case["val"] / n,
        "flexora_search_epochs": case["epochs"],
        **overrides,
    }
    spec = resolve_method(raw)
    batches = token_batches(n, case["data_seed"])
    ctx = MethodContext(LORA["target_modules"], "causal_lm", case["lr"], 0.0, 10, 0, lambda: iter(batches))
    model = spec.components["adapter"].apply(tiny_llama(), spec.params["adapter"], ctx, {})
    with torch.no_grad():
        for name, t in lora_tensors(model).items():
            t.copy_(torch.tensor(case["init"][name]))
    optimizer = spec.components["optimizer"].build(model, spec.params["optimizer"], ctx)
    return spec, model, optimizer, ctx


def run_ours(case: dict, monkeypatch, **overrides):
    spec, model, optimizer, ctx = build(case, **overrides)
    searched = {}
    original = flexora.finish

    def capture(model_, candidates, kept, restore=None, scale_kept=None):
        searched.update({n: t.detach().clone() for n, t in lora_tensors(model_).items()})
        return original(model_, candidates, kept, restore=restore, scale_kept=scale_kept)

    monkeypatch.setattr(flexora, "finish", capture)
    procedure = spec.components["procedure"]
    procedure.setup(model, optimizer, spec.params["procedure"], ctx)
    return procedure, model, searched


def gaps(procedure, searched, case) -> dict[str, float]:
    alpha = torch.tensor(procedure.search.history, dtype=torch.float64)
    ref_alpha = torch.tensor(case["alpha"], dtype=torch.float64)
    assert alpha.shape == ref_alpha.shape
    lora = max(
        (searched[n].double() - torch.tensor(v, dtype=torch.float64)).abs().max().item()
        for n, v in case["final"].items()
    )
    return {"alpha": (alpha - ref_alpha).abs().max().item(), "lora": lora}


@pytest.mark.parametrize("name", CASES)
def test_flexora_search_matches_the_authors_code(name, monkeypatch):
    case = load_fixture("flexora")["cases"][name]
    procedure, model, searched = run_ours(case, monkeypatch)
    found = gaps(procedure, searched, case)
    assert found["alpha"] <= ALPHA_TOL and found["lora"] <= LORA_TOL, found
    assert procedure.layers == case["selected"]
    # the fine-tuning stage: the LoRA init again, the kept layers' LoRA trains, the others' is frozen with B = 0
    for n, t in lora_tensors(model).items():
        layer = int(n.split(".")[1])
        torch.testing.assert_close(t.detach(), torch.tensor(case["init"][n]), rtol=0, atol=0)
        assert t.requires_grad == (layer in case["selected"]), n
    assert {h for m in model.modules() for h in m._forward_hooks.values()} == set()  # the gates are gone


def test_a_single_gate_factor_misses_the_fixture(monkeypatch):
    """The gate applied once (w instead of the authors' w^3 from three hooked inputs) moves alpha otherwise."""
    case = load_fixture("flexora")["cases"]["authors"]
    procedure, _, searched = run_ours(case, monkeypatch, flexora_gate_power=1)
    assert gaps(procedure, searched, case)["alpha"] > 1e-3


def test_a_kept_adam_state_misses_the_fixture(monkeypatch):
    """AdamW keeping its moments across the search (not the authors' fresh state each step) moves LoRA otherwise."""
    case = load_fixture("flexora")["cases"]["authors"]

    class KeepState(collections.defaultdict):
        def clear(self):
            pass

    original = torch.optim.AdamW

    def adamw(*args, **kwargs):
        opt = original(*args, **kwargs)
        opt.state = KeepState(dict)
        return opt

    monkeypatch.setattr(flexora.torch.optim, "AdamW", adamw)
    procedure, _, searched = run_ours(case, monkeypatch)
    assert gaps(procedure, searched, case)["lora"] > 1e-3


def test_the_fixture_holds_its_cases():
    fixture = load_fixture("flexora")
    assert fixture["produced_by"] == "scripts/parity/flexora.py" and sorted(fixture["cases"]) == sorted(CASES)
    assert fixture["hooked_per_lora_layer"] == ["lora_dropout.default", "lora_A.default", "lora_B.default"]
    for case in fixture["cases"].values():
        assert case["steps"] >= 10 and len(case["alpha"]) == case["steps"] and case["effective_weight_decay"] == 0.01
        assert 0 < len(case["selected"]) < 4  # the search chose some layers, not all
