"""SoMA's minor-component layer (adapter ``soma``; ``milora`` shares it) against numbers pinned by running
the authors' code.

The fixture comes from scripts/parity/soma.py: the ``Linear`` of ysj9909/SoMA@7ea8c0e7c2ac
``rein/peft/sora.py`` with ``sora_init("sora")`` (the residual W0 - s B0 A0 folded into its weight) on
the shared case of tests/parity_adapter_case.py (two seeded 24 x 20 / 20 x 24 linears, a seeded
regression loss, 12 torch.optim.AdamW steps, biases frozen). Here ``SomaAdapter.make_layer`` builds
ours on the same linears: W0 stays in the base and the initial product is subtracted through frozen
copies of the factors (a kept deviation, equal up to float32 rounding). Compared: the initial factors
(checksum), the outputs and gradients of the first step, a float64 checksum of B and A after every
step, B and A at the end. fp32 on CPU: 1e-5 on the factors and gradients, 4e-6 on the outputs (|y| <=
3.4, whose float32 spacing is 2.4e-7 to 4.8e-7: the two residual forms, W_res x + s B0 A0 x and W0 x,
round differently by up to ~3 ulps; 1.2e-6 seen), 1e-4 on checksums (sums of up to 480 entries). The
factors start from the minor singular vectors, the worst-conditioned ones (their singular values lie
closest together), so they carry the float32 SVD of the CPU's LAPACK path: on the machine that pinned
the fixture the factors differ by < 3e-8, on an AMD EPYC (same code) by up to 4.4e-6 (gradients 1.0e-6,
initial checksums 3.1e-5). A wrong choice of components misses by > 1e-4 (``test_the_comparison_can_fail``).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.adapters.soma import MiloraAdapter, SomaAdapter
from lorabench.methods.base import MethodContext
from tests.conftest import CONF_DIR
from tests.parity_adapter_case import base_linears, max_nested_diff, train_layers
from tests.parity_case import load_fixture

TOL, OUT_TOL, CHECKSUM_TOL = 1e-5, 4e-6, 1e-4
FIXTURE = load_fixture("soma")
SHAPES = [tuple(s) for s in FIXTURE["shapes"]]


def factors(layer: TriLayer) -> dict:
    return {"B": layer.lora_B, "A": layer.lora_A}


def our_layers(settings: dict, adapter=SomaAdapter) -> list[TriLayer]:
    params = adapter.Params(rank=settings["rank"], alpha=settings["alpha"])
    ctx = MethodContext(["lin"], "classification", settings["lr"], settings["weight_decay"], settings["steps"], 0)
    return [adapter().make_layer(f"layer{i}", base, params, ctx) for i, base in enumerate(base_linears(SHAPES))]


def run_ours(case: dict, layers=None) -> dict:
    settings = case["settings"]
    layers = our_layers(settings) if layers is None else layers
    return train_layers(layers, factors, lambda m: [p for p in m.parameters() if p.requires_grad], settings, SHAPES)


def gaps(ours: dict, case: dict) -> dict[str, float]:
    return {
        key: max_nested_diff(ours[key], case[key]) for key in ("init_checksum", "out0", "grad0", "trajectory", "final")
    }


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_soma_matches_the_authors_layer(name):
    case = FIXTURE["cases"][name]
    assert case["residual_gap"] < 1e-5  # the reference's folded weight is W0 minus its minor components
    found = gaps(run_ours(case), case)
    assert found["grad0"] <= TOL and found["final"] <= TOL and found["out0"] <= OUT_TOL, found
    assert found["trajectory"] <= CHECKSUM_TOL and found["init_checksum"] <= CHECKSUM_TOL, found


def test_milora_shares_the_layer():
    case = FIXTURE["cases"]["preset"]
    found = gaps(run_ours(case, our_layers(case["settings"], MiloraAdapter)), case)
    assert max(found.values()) <= CHECKSUM_TOL, found


def test_preset_case_is_the_preset_as_it_stands():
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "soma.yaml"), resolve=True)
    settings = FIXTURE["cases"]["preset"]["settings"]
    assert (settings["rank"], settings["alpha"]) == (preset["rank"], float(preset["alpha"]))
    assert settings["betas"] == [preset["beta1"], preset["beta2"]] and settings["eps"] == preset["eps"]
    assert FIXTURE["version"] == "7ea8c0e7c2ac" and FIXTURE["produced_by"] == "scripts/parity/soma.py"
    assert all(c["settings"]["steps"] >= 10 for c in FIXTURE["cases"].values())


def test_the_comparison_can_fail():
    """The major components (PiSSA's choice) and unsplit factors (U_min, S_min V_min^T) miss the fixture."""
    case = FIXTURE["cases"]["scaled"]
    settings = case["settings"]
    r, s = settings["rank"], settings["alpha"] / settings["rank"]
    for variant in ("major", "unsplit"):
        layers = []
        for base in base_linears(SHAPES):
            u, sv, vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
            sl = slice(0, r) if variant == "major" else slice(-r, None)
            root = torch.sqrt(sv[sl] / s)
            b, a = (
                (u[:, sl] * root, root[:, None] * vh[sl])
                if variant == "major"
                else (u[:, sl], (sv[sl] / s)[:, None] * vh[sl])
            )
            layers.append(TriLayer(base, b, torch.eye(r), a, s, train=("B", "A"), subtract_init=True))
        found = gaps(run_ours(case, layers), case)
        assert found["grad0"] > 1e-3 and found["final"] > 1e-4, (variant, found)
