"""NLoRA, IntTune and SLoRA (adapters ``nlora``, ``inttune``, ``slora``) against numbers pinned by running
the authors' code.

The fixture comes from scripts/parity/nlora.py: the ``Linear`` layer of TracyGuo2001/NLoRA@b66f88d7f94d's
peft fork (``nlora_init`` for NLoRA and IntTune, IntTune with lora_A and lora_B frozen as the authors'
inttune.py does; ``slora_init`` for SLoRA) on the shared case of tests/parity_adapter_case.py (two
seeded linear layers, a seeded regression loss, 12 torch.optim.AdamW steps). Here our adapters build
their layers on the same linears through ``make_layer``; SLoRA starts from the reference's random A
and M (the draws come from different generators, a kept deviation) and its init rule is checked
separately. Compared: the initial factors (checksum), the outputs and gradients of the first step,
a float64 checksum of every factor after every step, the factors at the end. fp32 on CPU: 1e-6 on
entries (the differences seen are float32 rounding), 1e-5 on checksums (sums of up to 120 entries).
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext
from lorabench.registry import ADAPTERS
from tests.conftest import CONF_DIR
from tests.parity_adapter_case import base_linears, max_nested_diff, train_layers
from tests.parity_case import load_fixture

TOL, CHECKSUM_TOL = 1e-6, 1e-5
FIXTURE = load_fixture("nlora")
CASES = sorted(FIXTURE["cases"])


def factors(layer: TriLayer) -> dict:
    return {"B": layer.lora_B, "M": layer.lora_M, "A": layer.lora_A}


def our_layers(settings: dict, seed: int = 0) -> list[TriLayer]:
    adapter = ADAPTERS.get(settings["method"])()
    params = adapter.Params(rank=settings["rank"], alpha=settings["alpha"])
    ctx = MethodContext(["lin"], "classification", settings["lr"], settings["weight_decay"], settings["steps"], seed)
    return [adapter.make_layer(f"layer{i}", base, params, ctx) for i, base in enumerate(base_linears())]


def run_ours(case: dict, layers: list[TriLayer] | None = None) -> dict:
    settings = case["settings"]
    layers = our_layers(settings) if layers is None else layers
    if settings["method"] == "slora":  # start from the reference's draws
        with torch.no_grad():
            for layer, init in zip(layers, case["init"]):
                assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
                layer.lora_A.copy_(torch.tensor(init["A"]))
                layer.lora_M.copy_(torch.tensor(init["M"]))
    return train_layers(layers, factors, lambda m: [p for p in m.parameters() if p.requires_grad], settings)


def gaps(ours: dict, case: dict) -> dict[str, float]:
    return {
        key: max_nested_diff(ours[key], case[key]) for key in ("init_checksum", "out0", "grad0", "trajectory", "final")
    }


@pytest.mark.parametrize("name", CASES)
def test_matches_the_authors_fork(name):
    case = FIXTURE["cases"][name]
    assert case["base_unchanged"]  # the authors' init leaves W0 untouched
    found = gaps(run_ours(case), case)
    assert max(v for k, v in found.items() if k not in ("trajectory", "init_checksum")) <= TOL, found
    assert found["trajectory"] <= CHECKSUM_TOL and found["init_checksum"] <= CHECKSUM_TOL, found


def test_the_fixture_holds_its_cases():
    assert FIXTURE["version"] == "b66f88d7f94d" and FIXTURE["produced_by"] == "scripts/parity/nlora.py"
    assert {c["settings"]["method"] for c in FIXTURE["cases"].values()} == {"nlora", "inttune", "slora"}
    for case in FIXTURE["cases"].values():
        assert case["settings"]["steps"] >= 10 and len(case["trajectory"]) == case["settings"]["steps"]


@pytest.mark.parametrize("method", ["nlora", "inttune", "slora"])
def test_preset_case_is_the_preset_as_it_stands(method):
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"), resolve=True)
    settings = FIXTURE["cases"][f"{method}_preset"]["settings"]
    assert (settings["rank"], settings["alpha"]) == (preset["rank"], float(preset["alpha"]))
    assert settings["betas"] == [preset["beta1"], preset["beta2"]] and settings["eps"] == preset["eps"]
    defaults = ADAPTERS.get(method).Params()
    assert (defaults.rank, defaults.alpha) == (8, 8.0)  # the authors' lora_rank = lora_alpha = 8


def test_slora_init_rule():
    """B = 0; A and M Kaiming uniform (a = sqrt(5)), U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in the reference
    and in ours (other draws)."""
    case = FIXTURE["cases"]["slora_reference_defaults"]
    r = case["settings"]["rank"]
    ours = our_layers(case["settings"])
    for ref, layer in zip(case["init"], ours):
        d_in = layer.in_features
        for name, fan_in, values in (
            ("A", d_in, ref["A"]),
            ("M", r, ref["M"]),
            ("A", d_in, layer.lora_A),
            ("M", r, layer.lora_M),
        ):
            t = torch.as_tensor(values, dtype=torch.float64)
            bound = 1 / math.sqrt(fan_in)
            assert t.abs().max() <= bound and t.abs().max() > 0.7 * bound, name
        assert torch.count_nonzero(torch.tensor(ref["B"])) == 0 and torch.count_nonzero(layer.lora_B) == 0


def test_the_comparison_can_fail():
    """The previous rule (the initial product subtracted, so the model starts at W0) and a Nystrom core
    divided by s both miss the fixture."""
    case = FIXTURE["cases"]["nlora_scaled"]
    settings = case["settings"]
    r, s = settings["rank"], settings["alpha"] / settings["rank"]
    for variant in ("subtract", "core_over_s"):
        layers = []
        for base in base_linears():
            w = base.weight.detach()
            core = w[:r, :r] / s if variant == "core_over_s" else w[:r, :r]
            layers.append(
                TriLayer(
                    base,
                    w[:, :r],
                    core,
                    w[:r, :],
                    s,
                    subtract_init=variant == "subtract",
                    keep_init=variant != "subtract",
                )
            )
        found = gaps(run_ours(case, layers), case)
        assert found["out0"] > 1e-3 and found["final"] > 1e-4, (variant, found)
