"""WaRA (adapter ``wara``) against numbers pinned from the paper's pipeline run literally.

The fixture comes from scripts/parity/wara.py: arXiv:2506.24092v1 Fig. 1 as written (a one-level 2-D
DWT of the input X, d_in x k features x tokens, one B A applied to all four subbands on their feature
axis, the 2-D IDWT cut to d_out x k and scaled by s, added to W0 X + b0), computed with PyWavelets
(pinned) and cross-checked against pytorch_wavelets; nothing of lorabench's. The authors' own module
(moeinheidari7829/WaRA) could not be fetched, so this is a check of our reading of the paper, not
parity with their code. Ours is built by the registered adapter (scale = alpha / r) on the fixture's W0
and b0, loaded with its A and B, and compared in float64: the output, Delta W (the pipeline applied to
the identity) and the gradients of <y, G> for A, B and X, at 1e-9 relative to max(1, |reference|).
The cases cover Haar on even and odd widths (zero and symmetric modes, an odd token count) and db2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.methods.adapters.wara import WaraAdapter, WaraLayer
from lorabench.methods.base import MethodContext
from tests.parity_case import load_fixture

TOL = 1e-9
CASES = ["haar_even", "haar_odd", "haar_odd_symmetric", "db2"]


def ours(case: dict) -> WaraLayer:
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in case["inputs"].items()}
    base = nn.Linear(case["d_in"], case["d_out"]).double().requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(t["W0"])
        base.bias.copy_(t["b0"])
    adapter = WaraAdapter()
    params = adapter.Params(
        rank=case["rank"], alpha=case["scale"] * case["rank"], wara_wavelet=case["wavelet"], wara_mode=case["mode"]
    )
    layer = adapter.make_layer("lin", base, params, MethodContext(["lin"], "causal_lm", 1e-3, 0.0, 1, 0))
    assert (layer.n_in, layer.n_out) == (case["n_in"], case["n_out"])
    with torch.no_grad():
        layer.wara_A.copy_(t["A"])
        layer.wara_B.copy_(t["B"])
    return layer


def measured(layer: WaraLayer, case: dict, update=None) -> dict[str, torch.Tensor]:
    x = torch.tensor(case["inputs"]["X"], dtype=torch.float64, requires_grad=True)
    g = torch.tensor(case["inputs"]["G"], dtype=torch.float64)
    out = layer(x) if update is None else layer.base(x) + update(x)
    (out * g).sum().backward()
    return {
        "out": out.detach(),
        "delta_weight": layer.delta_weight().detach(),
        "grad_A": layer.wara_A.grad,
        "grad_B": layer.wara_B.grad,
        "grad_X": x.grad,
    }


def gaps(got: dict[str, torch.Tensor], case: dict) -> dict[str, float]:
    out = {}
    for key, value in case["expected"].items():
        ref = torch.tensor(value, dtype=torch.float64)
        out[key] = ((got[key] - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
    return out


@pytest.mark.parametrize("name", CASES)
def test_wara_matches_the_papers_pipeline(name):
    case = load_fixture("wara")["cases"][name]
    layer = ours(case)
    worst = gaps(measured(layer, case), case)
    assert max(worst.values()) <= TOL, worst


def test_merged_layer_gives_the_pinned_output():
    case = load_fixture("wara")["cases"]["haar_odd"]
    layer = ours(case)
    x = torch.tensor(case["inputs"]["X"], dtype=torch.float64)
    ref = torch.tensor(case["expected"]["out"], dtype=torch.float64)
    with torch.no_grad():
        layer.merge()
        assert (layer(x) - ref).abs().max().item() <= 1e-12
        layer.unmerge()
        assert (layer(x) - ref).abs().max().item() <= 1e-12


def test_adapting_the_low_band_only_misses_the_fixture():
    """The fixture tells the shared-subband rule apart: B A on the low band alone (the high band dropped)
    is far off."""
    case = load_fixture("wara")["cases"]["haar_even"]
    layer = ours(case)

    def low_only(x):
        u = (layer.bands(x) @ layer.wara_A.T) @ layer.wara_B.T
        return layer.scale * layer.synthesis(torch.stack((u[0], torch.zeros_like(u[1]))))

    worst = gaps(measured(layer, case, update=low_only), case)
    assert worst["out"] > 1e-2 and worst["grad_A"] > 1e-2


def test_the_fixture_holds_its_cases():
    fixture = load_fixture("wara")
    assert sorted(fixture["cases"]) == sorted(CASES) and fixture["produced_by"] == "scripts/parity/wara.py"
    assert fixture["libraries_max_gap"] <= 1e-12  # PyWavelets and pytorch_wavelets agree on the pipeline
    for case in fixture["cases"].values():
        assert case["inputs"]["B"] and any(v != 0 for row in case["inputs"]["B"] for v in row)
