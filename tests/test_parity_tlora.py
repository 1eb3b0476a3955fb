"""TLoRA (adapter ``tlora``) against numbers pinned by running the authors' code.

The fixture comes from scripts/parity/tlora.py: the authors' ``TTMLoRALinearLayer`` (taozerui/tlora_diffusion
as stored in the copy marcocst/PEFTDiff@9c56d00bcbe6) on one frozen pretrained linear layer, trained with
torch.optim.AdamW on seeded inputs and upstream gradients (tests/parity_one_linear.py). Here our preset (with
each case's overrides) runs the same case through ``apply_method``, starting from the reference's initial
cores (their Kronecker factors, n x n, are our n x n x 1 x 1 cores). Compared: the outputs and the gradients
of every core at every step, the cores after the last step and a float64 checksum after every step, at 1e-5
relative to max(1, |reference|) (fp32, CPU); then the trained layer's Delta W against the authors' dense
W0 T + s Delta - W0, and merged into W0 against their output. A transform whose modes are read in the
other order (little-endian multi-indices) misses the fixture.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from omegaconf import OmegaConf

from lorabench.methods.adapters.layer import adapter_layers
from lorabench.methods.adapters.tlora import TransformedLowRankLayer, tensor_modes
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method
from lorabench.methods.spec import resolve_method
from tests.conftest import CONF_DIR
from tests.parity_case import load_fixture
from tests.parity_one_linear import OneLinear, plain, run

TOL = 1e-5
CASES = ["preset", "kronecker_lora", "ring3_decay", "residual_only"]


@lru_cache(maxsize=1)
def fixture() -> dict:
    return load_fixture("tlora")


@lru_cache(maxsize=1)
def preset() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / "tlora.yaml"), resolve=True)


def build_ours(case: dict):
    """tests/parity_one_linear.build_ours for this preset alone (without loading every preset)."""
    spec = resolve_method({**preset(), **case["ours"]})
    model = OneLinear(case["d_in"], case["d_out"], case["weight_seed"])
    ctx = MethodContext(["lin"], "causal_lm", case["lr"], case["weight_decay"], case["steps"], seed=0)
    return apply_method(model, spec, ctx), spec


def flat_gap(a, b) -> float:
    """max |a - b| / max(1, max |b|) over the values, whatever the two nestings (n x n or n x n x 1 x 1)."""
    a, b = torch.tensor(a, dtype=torch.float64).flatten(), torch.tensor(b, dtype=torch.float64).flatten()
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def gaps(ours: dict, ref: dict) -> dict[str, float]:
    assert [sorted(g) for g in ours["grads"]] == [sorted(g) for g in ref["grads"]], "gradient sets differ"
    return {
        "outputs": max(flat_gap(a, b) for a, b in zip(ours["outputs"], ref["outputs"])),
        "grads": max(flat_gap(a[n], b[n]) for a, b in zip(ours["grads"], ref["grads"]) for n in b),
        "final": max(flat_gap(ours["final"][n], ref["final"][n]) for n in ref["final"]),
        "trajectory": max(abs(a - b) for o, r in zip(ours["trajectory"], ref["trajectory"]) for a, b in zip(o, r)),
    }


def run_ours(case: dict, forward_of=None) -> tuple[dict, TransformedLowRankLayer]:
    built, _ = build_ours(case)
    layer = built.model.lin
    assert isinstance(layer, TransformedLowRankLayer)
    tensors = {n: layer.get_parameter(n) for n in case["init"]}
    trainable = {n.removeprefix("lin.") for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable == set(case["init"])
    with torch.no_grad():
        for n, value in case["init"].items():
            tensors[n].copy_(torch.tensor(value).reshape(tensors[n].shape))
    out = run(forward_of(layer) if forward_of else built.model, tensors, built.optimizer, case)
    return out, layer


@pytest.mark.parametrize("name", CASES)
def test_tlora_matches_the_authors_layer(name):
    case = fixture()["cases"][name]
    assert case["init_output_gap"] == 0.0  # their model is W0 at step 0 too
    ours, layer = run_ours(case)
    found = gaps(ours, case)
    assert max(found.values()) <= TOL, found
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(case["eval_input_seed"]))
    with torch.no_grad():
        assert flat_gap(plain(layer.delta_weight()), case["final_delta_weight"]) <= TOL
        assert flat_gap(plain(layer(x)), case["eval_output"]) <= TOL
        layer.merge()  # W0 T + s Delta
        assert flat_gap(plain(layer(x)), case["eval_output"]) <= TOL
        layer.unmerge()
        assert flat_gap(plain(layer(x)), case["eval_output"]) <= TOL


def test_modes_read_little_endian_miss_the_fixture():
    """The same cores with the multi-index read the other way round (T from the cores in reverse order)."""
    case = fixture()["cases"]["ring3_decay"]

    def reversed_modes(layer):
        def forward(x):
            cores = list(layer.transform_cores)[::-1]
            saved = layer.transform_cores
            layer.transform_cores = torch.nn.ParameterList(cores)
            try:
                return layer.base(x) + x @ layer.delta_weight().T
            finally:
                layer.transform_cores = saved

        return forward

    ours, _ = run_ours(case, forward_of=reversed_modes)
    assert gaps(ours, case)["outputs"] > 1e-3


def test_the_fixture_holds_its_cases_and_our_split():
    data = fixture()
    assert sorted(data["cases"]) == sorted(CASES) and data["produced_by"] == "scripts/parity/tlora.py"
    assert all(case["steps"] >= 10 for case in data["cases"].values())
    case = data["cases"]["preset"]
    assert list(tensor_modes(case["d_in"], 3)) == data["in_modes"]
    assert list(tensor_modes(case["d_out"], 3)) == data["out_modes"]


def test_preset_defaults():
    built, spec = build_ours(
        {"d_in": 24, "d_out": 16, "weight_seed": 0, "lr": 1e-3, "weight_decay": 0.0, "steps": 1, "ours": {}}
    )
    p = spec.params["adapter"]
    assert (p.rank, p.alpha, p.tlora_transform_rank, p.tlora_residual, p.tlora_modes) == (6, 1.0, 2, "tr", 3)
    (layer,) = adapter_layers(built.model).values()
    assert [tuple(c.shape) for c in layer.transform_cores] == [(2, 2, 2, 2), (3, 3, 2, 2), (4, 4, 2, 2)]
    assert layer.scale == 1.0 / 6**0.5
