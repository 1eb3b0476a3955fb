"""SLTrain (adapter ``sltrain``) against numbers pinned by running the authors' code.

The fixture comes from scripts/parity/sltrain.py: andyjm3/SLTrain@2335d62c75df's ``SpLoRaLinear`` (with
its C++ op sparse-lora/sparse_linear.cpp) added to one frozen pretrained linear layer, trained with
torch.optim.AdamW on seeded inputs and upstream gradients (tests/parity_one_linear.py). Here our preset
(with each case's overrides) runs the same case through ``apply_method``, starting from the reference's
initial A, B, values and support (the draws come from different generators). Compared: the outputs and
the gradients of A, B and the sparse values at every step, the tensors after the last step and a float64
checksum after every step, at 1e-6 relative to max(1, |reference|) (fp32, CPU); then the trained layer's
Delta W against the authors' dense W = B (s A) + scatter(S), and merged into W0 against their output.
Besides, our support draw equals the authors' on a generator in the same state.
"""

from __future__ import annotations

import pytest
import torch

from lorabench.methods.adapters.layer import adapter_layers
from lorabench.methods.adapters.sltrain import SparseLowRankLayer, draw_support
from tests.parity_case import load_fixture
from tests.parity_one_linear import build_ours, gap, plain, run, worst_gap

TOL = 1e-6
CASES = ["authors_init", "preset", "dense_decay"]


def run_ours(case: dict, forward_of=None) -> tuple[dict, SparseLowRankLayer]:
    built, spec, _ = build_ours("sltrain", case)
    layer = built.model.lin
    assert isinstance(layer, SparseLowRankLayer)
    tensors = {n: getattr(layer, n) for n in case["init"]}
    trainable = {n.split(".")[-1] for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable == set(case["init"])
    assert layer.sparse_index.numel() == len(case["support"])  # the same support size rule
    with torch.no_grad():
        for n, value in case["init"].items():
            tensors[n].copy_(torch.tensor(value))
        layer.sparse_index.copy_(torch.tensor(case["support"]))
    out = run(forward_of(layer) if forward_of else built.model, tensors, built.optimizer, case)
    return out, layer


@pytest.mark.parametrize("name", CASES)
def test_sltrain_matches_the_authors_layer(name):
    case = load_fixture("sltrain")["cases"][name]
    ours, layer = run_ours(case)
    gaps = worst_gap(ours, case)
    assert max(gaps.values()) <= TOL, gaps
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(case["eval_input_seed"]))
    with torch.no_grad():
        assert gap(plain(layer.delta_weight()), case["final_delta_weight"]) <= TOL
        assert gap(plain(layer(x)), case["eval_output"]) <= TOL
        layer.merge()  # W0 + s B A + S
        assert gap(plain(layer(x)), case["eval_output"]) <= 1e-5
        layer.unmerge()
        assert gap(plain(layer(x)), case["eval_output"]) <= 1e-5


def test_a_misplaced_support_misses_the_fixture():
    """S read column-major (index j d_out + i instead of i d_in + j) gives other gradients of the values."""
    case = load_fixture("sltrain")["cases"]["dense_decay"]

    def transposed(layer):
        def forward(x):
            v = layer.sparse_value
            flat = v.new_zeros(layer.out_features * layer.in_features).scatter(0, layer.sparse_index, v)
            s = flat.view(layer.in_features, layer.out_features).T
            low = layer.scale * ((x @ layer.lora_A.T) @ layer.lora_B.T)
            return layer.base(x) + low + x @ s.T

        return forward

    ours, _ = run_ours(case, forward_of=transposed)
    assert worst_gap(ours, case)["grads"] > 1e-3


def test_our_support_draw_is_the_authors():
    for draw in load_fixture("sltrain")["support_draws"]:
        gen = torch.Generator().manual_seed(draw["seed"])
        index = draw_support(draw["d_out"], draw["d_in"], draw["density"], gen)
        assert index.tolist() == draw["index"], draw["seed"]
        bound = 1 / draw["d_in"] ** 0.5  # the authors' value draw, which our preset replaces by zeros
        assert max(abs(v) for v in draw["values"]) <= bound and len(draw["values"]) == len(draw["index"])


def test_preset_defaults():
    built, spec, _ = build_ours(
        "sltrain", {"d_in": 24, "d_out": 16, "weight_seed": 0, "lr": 1e-3, "weight_decay": 0.0, "steps": 1, "ours": {}}
    )
    params = spec.params["adapter"]
    assert (params.rank, params.alpha, params.sltrain_density, params.sltrain_value_init) == (8, 16.0, 0.03, "zero")
    (layer,) = adapter_layers(built.model).values()
    assert layer.lora_A.abs().max() <= 1 / 24**0.5 and torch.count_nonzero(layer.lora_B) == 0
    assert layer.sparse_index.numel() == int(0.03 * 16 * 24) and torch.count_nonzero(layer.sparse_value) == 0


def test_the_fixture_holds_its_cases():
    fixture = load_fixture("sltrain")
    assert sorted(fixture["cases"]) == sorted(CASES) and fixture["produced_by"] == "scripts/parity/sltrain.py"
    assert all(case["steps"] >= 10 for case in fixture["cases"].values())
    assert all(len(case["support"]) > 0 for case in fixture["cases"].values())
