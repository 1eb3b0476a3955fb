"""Hydra (adapter ``hydra_lora``) against numbers pinned by running the authors' code.

The fixture comes from scripts/parity/hydra_lora.py: extremebird/Hydra@413845785966's ``Hydra`` modules
(nlu/: bias-free, Kaiming-uniform down-projections, composed as RobertaOutput's hydra branch;
elevater/: biased, N(0, 0.02) or Kaiming, with a scale, and its ``HydraMLP`` block) around one
pretrained linear layer, trained with torch.optim.AdamW on seeded inputs and upstream gradients
(tests/parity_one_linear.py). Here our preset (with each case's overrides) runs the same case through
``apply_method``, starting from the reference's initial tensors (the draws come from different
generators). Compared: the outputs and the gradients of every branch tensor at every step, the tensors
after the last step and a float64 checksum after every step, at 1e-6 relative to max(1, |reference|)
(fp32, CPU); then the trained layer merged into W0 and b0 must give the reference's (unmerged) output.
"""

from __future__ import annotations

import pytest
import torch

from lorabench.methods.adapters.hydra_lora import HydraLayer
from lorabench.methods.adapters.layer import adapter_layers
from tests.parity_case import load_fixture
from tests.parity_one_linear import build_ours, gap, plain, run, worst_gap

TOL = 1e-6
CASES = ["reference_defaults", "preset", "clip", "scaled"]


def run_ours(case: dict, forward_of=None) -> tuple[dict, HydraLayer]:
    built, spec, _ = build_ours("hydra_lora", case)
    layer = built.model.lin
    assert isinstance(layer, HydraLayer)
    tensors = {n: getattr(layer, n) for n in case["init"]}
    trainable = {n.split(".")[-1] for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable == set(case["init"])
    with torch.no_grad():
        for n, value in case["init"].items():
            tensors[n].copy_(torch.tensor(value))
    out = run(forward_of(layer) if forward_of else built.model, tensors, built.optimizer, case)
    return out, layer


@pytest.mark.parametrize("name", CASES)
def test_hydra_matches_the_authors_modules(name):
    case = load_fixture("hydra_lora")["cases"][name]
    ours, layer = run_ours(case)
    gaps = worst_gap(ours, case)
    assert max(gaps.values()) <= TOL, gaps
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(case["eval_input_seed"]))
    with torch.no_grad():
        assert gap(plain(layer(x)), case["eval_output"]) <= TOL
        layer.merge()  # W0 + s (Bp Ap + Bs As W0), b0 + s (Bp ap + bp + Bs As b0 + Bs as + bs)
        assert gap(plain(layer(x)), case["eval_output"]) <= 1e-5
        layer.unmerge()
        assert gap(plain(layer(x)), case["eval_output"]) <= 1e-5


def test_the_sequential_branch_must_read_the_bias():
    """The authors' sequential branch reads the layer's output with its bias: a branch on W0 x alone
    (what this adapter computed before) misses the fixture."""
    case = load_fixture("hydra_lora")["cases"]["reference_defaults"]

    def without_bias(layer):
        def forward(x):
            h0 = layer.base(x)
            par = layer._branch(x, layer.par_A, None, layer.par_B, None)
            return h0 + par + layer._branch(h0 - layer.base.bias, layer.seq_A, None, layer.seq_B, None)

        return forward

    ours, _ = run_ours(case, forward_of=without_bias)
    assert worst_gap(ours, case)["grads"] > 1e-3


def test_preset_defaults_are_the_authors_glue_setting():
    built, spec, _ = build_ours(
        "hydra_lora",
        {"d_in": 10, "d_out": 8, "weight_seed": 0, "lr": 1e-3, "weight_decay": 0.0, "steps": 1, "ours": {}},
    )
    params = spec.params["adapter"]
    assert (params.rank, params.sequential_rank, params.scale, params.bias, params.down_init) == (
        4,
        8,
        1.0,
        False,
        "kaiming",
    )
    (layer,) = adapter_layers(built.model).values()
    bound = 1 / 10**0.5  # nn.Linear's Kaiming uniform on d_in = 10
    assert layer.par_A.abs().max() <= bound and torch.count_nonzero(layer.par_B) == 0


def test_the_fixture_holds_its_cases():
    fixture = load_fixture("hydra_lora")
    assert sorted(fixture["cases"]) == sorted(CASES) and fixture["produced_by"] == "scripts/parity/hydra_lora.py"
    assert all(case["steps"] >= 10 for case in fixture["cases"].values())
