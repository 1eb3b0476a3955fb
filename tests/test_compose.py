"""protocol=compose: the merges' rules on hand-made task vectors, the merged update applied to and
removed from a peft LoRA model exactly, the CLI end to end on a tiny BERT and GLUE-format fixtures
(the record's rows, each expert trained from the adapter's initial factors, the table), and the
config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorabench.config import ComposeConfig
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.protocols.compose import protocol as compose_protocol
from lorabench.protocols.compose.merges import MERGES, MergeInput, stored_params
from lorabench.results.record import validate_record
from lorabench.validate import validate_config
from tests.method_harness import TwoLinears
from tests.test_continual import glue, only_record, train  # noqa: F401  (glue: the GLUE-format fixture)


def merge_input(deltas, weight=1.0, density=0.2, seed=0, factors=None) -> MergeInput:
    settings = ComposeConfig(weight=weight, density=density)
    return MergeInput([torch.as_tensor(d, dtype=torch.float64) for d in deltas], factors or [], settings, seed)


# -- the merges' rules --------------------------------------------------------------------------------
D1 = [[1.0, -2.0], [3.0, 0.0]]
D2 = [[3.0, 1.0], [-1.5, 0.5]]


def test_average_and_task_arithmetic_by_hand():
    assert MERGES.get("average").fn(merge_input([D1, D2])).tolist() == [[2.0, -0.5], [0.75, 0.25]]
    assert MERGES.get("task_arithmetic").fn(merge_input([D1, D2], weight=0.5)).tolist() == [[2.0, -0.5], [0.75, 0.25]]
    assert MERGES.get("task_arithmetic").fn(merge_input([D1, D2])).tolist() == [[4.0, -1.0], [1.5, 0.5]]


def test_ties_elects_the_sign_by_total_mass_and_averages_the_agreeing_entries():
    """density 1 (nothing trimmed): (0,0) both +: mean 2; (0,1) -2 + 1 < 0: only -2; (1,0) 3 - 1.5 > 0:
    only 3; (1,1) 0 and 0.5: + elected, 0 does not count as agreeing: 0.5."""
    got = MERGES.get("ties").fn(merge_input([D1, D2], density=1.0))
    assert got.tolist() == [[2.0, -2.0], [3.0, 0.5]]
    # density 0.5: each task vector keeps its top 2 of 4 entries by magnitude: D1 -> -2, 3; D2 -> 3, -1.5;
    # (0,0): 3 alone; (0,1): -2 alone; (1,0): 3 - 1.5 > 0, 3; (1,1): nothing kept
    got = MERGES.get("ties").fn(merge_input([D1, D2], density=0.5))
    assert got.tolist() == [[3.0, -2.0], [3.0, 0.0]]


def test_dare_keeps_a_random_share_rescaled_and_is_seeded():
    deltas = [torch.randn(40, 30, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in (1, 2)]
    full = MERGES.get("dare_linear").fn(merge_input(deltas, density=1.0))
    assert torch.allclose(full, deltas[0] + deltas[1])  # nothing dropped: task arithmetic
    half = MERGES.get("dare_linear").fn(merge_input([deltas[0]], density=0.5, seed=3))
    kept = half != 0
    assert 0.4 < kept.double().mean() < 0.6
    assert torch.allclose(half[kept], 2 * deltas[0][kept])  # the kept entries rescaled by 1 / density
    again = MERGES.get("dare_linear").fn(merge_input([deltas[0]], density=0.5, seed=3))
    other = MERGES.get("dare_linear").fn(merge_input([deltas[0]], density=0.5, seed=4))
    assert torch.equal(half, again) and not torch.equal(half, other)
    state = torch.random.get_rng_state()
    MERGES.get("dare_ties").fn(merge_input(deltas, density=0.5, seed=3))
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left as it was


def test_lego_at_full_rank_is_the_scaled_concatenation():
    """k = K r: every unit its own cluster, no norm decay, output scale sqrt(r / k) = 1 / sqrt(K)."""
    gen = torch.Generator().manual_seed(0)
    factors = [(torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)) for _ in range(2)]
    inp = MergeInput([b @ a for b, a in factors], factors, ComposeConfig(lego_rank=4), 0)
    got = MERGES.get("lego").fn(inp)
    assert torch.allclose(got, (inp.deltas[0] + inp.deltas[1]) / 2**0.5, atol=1e-5)
    assert stored_params(MERGES.get("lego"), got, factors, inp.settings) == 4 * (6 + 5)


def test_stored_sizes():
    factors = [(torch.zeros(6, 2), torch.zeros(2, 5))] * 3
    merged = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert stored_params(MERGES.get("average"), torch.zeros(6, 5), factors, ComposeConfig()) == 6 * (6 + 5)
    assert stored_params(MERGES.get("ties"), merged, factors, ComposeConfig()) == 2


# -- the merged update on a peft model ------------------------------------------------------------------
def peft_two_linears():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(TwoLinears(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], lora_dropout=0.0))


def test_merged_update_is_added_to_the_base_and_removed_exactly():
    model = peft_two_linears()
    layers = compose_protocol.lora_layers(model)
    assert sorted(n.split(".")[-1] for n in layers) == ["q", "v"]
    gen = torch.Generator().manual_seed(1)
    experts = {
        task: {
            n: (torch.randn(m.out_features, 2, generator=gen), torch.randn(2, m.in_features, generator=gen))
            for n, m in layers.items()
        }
        for task in ("a", "b")
    }
    x = torch.randn(3, 24, generator=gen)
    before = model(x).detach()
    settings = ComposeConfig(weight=1.0)
    deltas, sizes = compose_protocol.merged_deltas(layers, experts, "task_arithmetic", settings, seed=0)
    with torch.no_grad():
        reference = TwoLinears()
        for lin, (name, layer) in zip((reference.q, reference.v), layers.items()):
            s = layer.scaling["default"]  # alpha / r = 2
            assert s == 2.0
            lin.weight += s * sum(experts[t][name][0] @ experts[t][name][1] for t in ("a", "b"))
    with compose_protocol.applied(layers, deltas):
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    assert torch.equal(model(x), before)  # the base weights and the adapter are back
    assert sizes == {n: 2 * 2 * (m.in_features + m.out_features) for n, m in layers.items()}


def test_snapshot_and_load_factors_round_trip():
    model = peft_two_linears()
    layers = compose_protocol.lora_layers(model)
    initial = compose_protocol.snapshot(layers)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B["default"].weight.add_(1.0)
    assert not all(torch.equal(m.lora_B["default"].weight, initial[n][0]) for n, m in layers.items())
    compose_protocol.load_factors(layers, initial)
    assert all(torch.equal(m.lora_B["default"].weight, initial[n][0]) for n, m in layers.items())


def test_a_model_without_lora_layers_is_refused():
    with pytest.raises(RuntimeError, match="no peft LoRA layer"):
        compose_protocol.lora_layers(nn.Linear(2, 2))


# -- the CLI end to end -------------------------------------------------------------------------------------
def compose_args(folders: dict[str, Path], results: Path, tasks=("sst2", "rte"), *extra: str) -> list[str]:
    return [
        "protocol=compose",
        "model=tiny_bert",
        "method=lora",
        f"protocol.compose.tasks=[{','.join(tasks)}]",
        "protocol.compose.steps_per_task=3",
        "protocol.compose.merges=[average,task_arithmetic,ties,dare_linear,dare_ties,lego]",
        *(f"+protocol.compose.data_dirs.{t}={folders[t]}" for t in tasks),
        "dataset.max_length=32",
        "train.global_batch_size=4",
        "hardware.micro_batch_size=2",
        "train.lr=0.05",
        f"results_dir={results}",
        "progress=false",
        *extra,
    ]


def test_compose_cli_run_records_every_combination(glue, tmp_path, monkeypatch):  # noqa: F811
    starts = []
    load = compose_protocol.load_factors

    def spy(layers, factors):  # every expert starts from the adapter's initial factors
        starts.append({n: (b.clone(), a.clone()) for n, (b, a) in factors.items()})
        load(layers, factors)

    monkeypatch.setattr(compose_protocol, "load_factors", spy)
    assert train(*compose_args(glue, tmp_path)) == 0
    _, record = only_record(tmp_path)
    assert validate_record(record) is None and record["status"] == "completed"
    assert record["run_id"].startswith("lora-compose-sst2+rte-tiny_bert-s0-")
    report = record["protocol_report"]
    assert report["tasks"] == ["sst2", "rte"] and report["experts"] == ["sst2", "rte"]
    names = ["expert", "base", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "lego"]
    assert list(report["rows"]) == names
    for name in names:
        row = report["rows"][name]
        assert sorted(row["scores"]) == ["rte", "sst2"]
        assert row["average"] == pytest.approx(
            (row["scores"]["sst2"]["accuracy"] + row["scores"]["rte"]["accuracy"]) / 2
        )
    # two experts, each from the initial factors (the first two loads), then the first expert restored
    assert len(starts) == 3
    assert all(torch.equal(starts[0][n][0], starts[1][n][0]) for n in starts[0])
    assert not all(torch.equal(starts[0][n][0], starts[2][n][0]) for n in starts[0])  # a trained expert
    assert report["rows"]["lego"]["stored_params"] < report["rows"]["average"]["stored_params"]
    assert report["expert_params"] > 0 and report["rows"]["average"]["stored_params"] == 2 * report["expert_params"]
    m = record["metrics"]
    assert m["primary"] == "average_score" and m["final"]["average_score"] == report["rows"]["average"]["average"]
    assert m["final"]["ties/rte"] == report["rows"]["ties"]["scores"]["rte"]["accuracy"]
    assert [h["expert"] for h in record["history"]] == ["sst2", "rte"]
    assert record["progress"]["max_steps"] == 6

    from lorabench.results.protocol_table import build_protocol_rows
    from lorabench.results.table import collect

    table, note = build_protocol_rows(collect(tmp_path, protocol="compose")[0], "compose")
    assert [row["combination"] for row in table.values] == names and "expert = each task" in note
    lego = table.values[-1]
    assert lego["rte"]["mean"] == pytest.approx(100 * report["rows"]["lego"]["scores"]["rte"]["accuracy"])
    assert json.loads(json.dumps(table.values))  # csv/json-ready numbers


# -- config errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["protocol.compose.tasks=[sst2]"], "has one task; composition needs two or more"),
        (
            ["protocol.compose.merges=[average,soup]"],
            "unknown protocol.compose.merges entry 'soup'; valid choices: average",
        ),
        (["method=dora"], "method 'dora' has DoRA \\(use_dora=true\\); use a LoRA method"),
        (["method=galore"], "method 'galore' has adapter 'none'"),
        (["method=vera"], "method 'vera' has adapter 'vera'"),
        (["method=qlora"], "quantizes to 4 bits"),
        (["method=adalora"], "has adapter 'adalora'"),
        (["protocol.compose.lego_rank=17"], "lego_rank=17 exceeds the 16 rank-1 units .* use 1..16"),
        (["protocol.compose.density=0"], "protocol.compose.density=0.0 is invalid; it must be in \\(0, 1\\]"),
        (["protocol.compose.tasks=[sst2,stsb]"], "must share one head and label count"),
        (["protocol.compose.tasks=[rte,mrpc]"], "protocol=compose: dataset='sst2' must be the first task"),
        (["hardware=cpu_ddp2"], "protocol=compose with classification tasks trains one head per task"),
    ],
)
def test_compose_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(
            compose(["protocol=compose", "model=tiny_bert", "protocol.compose.tasks=[sst2,rte]", *overrides])
        )


def test_compose_config_composes_with_the_first_task_as_dataset():
    cfg = validate_config(compose(["protocol=compose", "model=minilm_l6", "method=lora"]))
    assert cfg.dataset.name == "sst2" and cfg.protocol.compose.tasks == ["sst2", "rte", "mrpc"]
    assert cfg.protocol.compose.merges == ["average", "task_arithmetic", "ties", "dare_ties", "lego"]
    assert cfg.protocol.compose.density == 0.2 and cfg.protocol.compose.lego_rank is None
