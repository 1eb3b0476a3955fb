"""protocol=federated: partitions, aggregation rules, DP accounting, validation, and Flower runs of
2 clients x 2 rounds end to end (record, FedSVD's orthonormal A, interruption and resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorabench.config import FederatedConfig
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.protocols.federated.aggregation import AGGREGATIONS, refactorise
from lorabench.protocols.federated.partition import partition
from lorabench.protocols.federated.privacy import epsilon_after, noise_multiplier_for
from lorabench.validate import validate_config
from tests.conftest import tiny_overrides


# -- partitions -------------------------------------------------------------------------------------
def test_iid_partition_covers_every_example_once_in_near_equal_parts():
    parts = partition([i % 2 for i in range(103)], 4, "iid", seed=3, alpha=0.5, min_size=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == partition([i % 2 for i in range(103)], 4, "iid", seed=3, alpha=0.5, min_size=1)
    assert parts != partition([i % 2 for i in range(103)], 4, "iid", seed=4, alpha=0.5, min_size=1)


def test_dirichlet_partition_skews_labels_more_for_small_alpha():
    labels = [i % 2 for i in range(2000)]

    def mean_majority_share(alpha):
        parts = partition(labels, 5, "dirichlet", seed=0, alpha=alpha, min_size=0)
        assert sorted(i for p in parts for i in p) == list(range(2000))
        shares = [max(Counter(labels[i] for i in p).values()) / len(p) for p in parts if p]
        return sum(shares) / len(shares)

    assert mean_majority_share(0.1) > 0.85
    assert mean_majority_share(100.0) < 0.6


def test_a_client_below_one_micro_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="client 0 gets 3 training examples"):
        partition([0] * 10, 4, "iid", seed=0, alpha=1.0, min_size=4)


# -- aggregation ------------------------------------------------------------------------------------
def test_the_registry_and_the_config_name_the_same_aggregations():
    assert AGGREGATIONS.names() == sorted(FederatedConfig.AGGREGATIONS)
    frozen = [n for n, cls in AGGREGATIONS.items() if cls.needs_frozen_a]
    assert frozen == list(FederatedConfig.FROZEN_A_AGGREGATIONS)


def test_fedsvd_refactorisation_keeps_the_product_and_orthonormalises_a():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    state = {"m.lora_A.default.weight": a, "m.lora_B.default.weight": b, "head.weight": torch.ones(3)}
    out = refactorise(state)
    new_a, new_b = out["m.lora_A.default.weight"], out["m.lora_B.default.weight"]
    assert new_a.shape == a.shape and new_b.shape == b.shape
    torch.testing.assert_close(new_b @ new_a, b @ a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_a @ new_a.T, torch.eye(4), atol=1e-5, rtol=1e-5)
    assert torch.equal(out["head.weight"], state["head.weight"])
    norms = new_b.norm(dim=0)  # columns of U Σ: non-increasing singular values
    assert torch.all(norms[:-1] >= norms[1:] - 1e-6)


def test_fedavg_of_b_with_a_shared_is_the_average_of_the_products():
    """FFA-LoRA's exactness, through Flower's own aggregation of the reply records."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, generator=g)
    bs = [torch.randn(5, 2, generator=g) for _ in range(3)]
    weights = [10, 20, 30]
    replies = [
        RecordDict({"arrays": ArrayRecord({"B": b}), "metrics": MetricRecord({"num-examples": w})})
        for b, w in zip(bs, weights)
    ]
    mean_b = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()["B"]
    expected = sum(w * (b @ a) for b, w in zip(bs, weights)) / sum(weights)
    torch.testing.assert_close(mean_b @ a, expected, atol=1e-5, rtol=1e-5)


# -- privacy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_the_noise_multiplier_spends_the_target_epsilon_over_the_rounds(target):
    sigma = noise_multiplier_for(target, 1e-5, rounds=10)
    spent = epsilon_after(sigma, 1e-5, rounds=10)
    assert spent <= target and spent > 0.97 * target
    assert epsilon_after(sigma, 1e-5, rounds=5) < spent  # composition: fewer rounds spend less
    assert epsilon_after(sigma * 1.5, 1e-5, rounds=10) < spent


def test_gaussian_mechanism_epsilon_matches_the_rdp_formula_for_one_release():
    """One release at sample rate 1: RDP of order a is a / (2 sigma^2); epsilon is the minimum over
    orders of rdp + log(1/delta) / (a - 1) with Opacus' improved conversion (Balle et al. 2020)."""
    sigma, delta = 2.0, 1e-5
    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(12, 64)])  # Opacus' default orders
    rdp = orders / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert epsilon_after(sigma, delta, 1) == pytest.approx(float(np.nanmin(eps)), rel=1e-6)


# -- validation -------------------------------------------------------------------------------------
def _config(*overrides):
    return compose(["model=tiny_bert", "dataset=sst2", "protocol=federated", *overrides])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=lora", "protocol.federated.aggregation=fedsvd"], "needs a LoRA method with freeze_a=true"),
        (
            ["method=ffa_lora", "protocol.federated.aggregation=fedsvd", "protocol.federated.dp_target_epsilon=8"],
            "not supported",
        ),
        (["method=lisa"], "does not run method procedures"),
        (["method=lora", "protocol.federated.aggregation=fedprox"], "valid choices: fedavg, fedsvd"),
        (["method=lora", "protocol.federated.partition=shards"], "valid choices: iid, dirichlet"),
        (["method=lora", "protocol.federated.clients_per_round=9"], "larger than protocol.federated.clients=4"),
        (["method=lora", "protocol.federated.dp_delta=0"], "dp_delta=0"),
    ],
)
def test_bad_federated_configs_are_refused_before_torch(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(*overrides))


def test_only_the_chosen_protocol_enters_the_run_id():
    from lorabench.results.record import run_id

    single = _config("method=lora", "protocol=single")
    assert run_id(single) == run_id(_config("method=lora", "protocol=single", "protocol.federated.rounds=9"))
    fed = _config("method=lora")
    assert run_id(fed).startswith("lora-federated-sst2-tiny_bert-s0-")
    assert run_id(fed) == run_id(_config("method=lora", "protocol.continual.steps_per_task=7"))
    assert run_id(fed) != run_id(_config("method=lora", "protocol.federated.rounds=9"))


# -- Flower runs ------------------------------------------------------------------------------------
FED = [
    "protocol=federated",
    "protocol.federated.clients=2",
    "protocol.federated.rounds=2",
    "protocol.federated.local_steps=2",
]


def _train(tmp_path, sst2_dir, *extra, env=None):
    cmd = [
        sys.executable,
        "-m",
        "lorabench.cli",
        "train",
        *tiny_overrides("classification", sst2_dir, tmp_path / "runs"),
        "train.lr=0.01",
        *FED,
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, **(env or {})})


def _record(tmp_path) -> tuple[dict, Path]:
    (path,) = list((tmp_path / "runs").glob("*/record.json"))
    return json.loads(path.read_text()), path.parent


def test_ffa_lora_with_dp_runs_two_rounds_and_an_interrupted_run_resumes_to_the_same_result(sst2_dir, tmp_path):
    args = ("method=ffa_lora", "protocol.federated.dp_target_epsilon=8", "protocol.federated.target=0.5")
    whole = _train(tmp_path / "whole", sst2_dir, *args)
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]
    record, run_dir = _record(tmp_path / "whole")
    assert record["status"] == "completed"
    report = record["protocol_report"]
    assert [r["round"] for r in report["history"]] == [1, 2]
    assert report["client_sizes"] == [24, 24] and report["dp"]["accountant"].startswith("opacus rdp")
    eps = [r["epsilon"] for r in report["history"]]
    assert eps[0] < eps[1] <= 8.0 and eps[1] > 7.7
    assert report["rounds_to_target"] == 1  # accuracy >= 0.5 after round 1 on the balanced fixture
    # FFA-LoRA: only B (and the head) travel; both ways the same arrays
    trained = record["cost"]["trainable_params"] * 4 * 2
    assert report["history"][0]["uplink_bytes"] == report["history"][0]["downlink_bytes"] == trained
    assert [h["step"] for h in record["history"]] == [1, 2]

    cut = _train(tmp_path / "cut", sst2_dir, *args, env={"LORABENCH_FAULT_AT_ROUND": "1"})
    assert cut.returncode == 130, (cut.stdout + cut.stderr)[-3000:]
    interrupted, _ = _record(tmp_path / "cut")
    assert interrupted["status"] == "canceled" and len(interrupted["protocol_report"]["history"]) == 1
    resumed = _train(tmp_path / "cut", sst2_dir, *args, "resume=auto")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    again, again_dir = _record(tmp_path / "cut")
    assert again["status"] == "completed" and again["resumed_from"][-1]["round"] == 1
    assert again["run_id"] == record["run_id"]
    assert [h["metrics"] for h in again["protocol_report"]["history"]] == [h["metrics"] for h in report["history"]]
    assert [h["client_loss"] for h in again["protocol_report"]["history"]] == pytest.approx(
        [h["client_loss"] for h in report["history"]], rel=1e-6
    )
    one, two = load_file(run_dir / "adapter.safetensors"), load_file(again_dir / "adapter.safetensors")
    assert one.keys() == two.keys()
    for key in one:  # the DP noise and the data order are seeded per round: the same weights
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=1e-5)


def test_fedsvd_leaves_an_orthonormal_a_and_sends_a_down_but_not_up(sst2_dir, tmp_path):
    out = _train(
        tmp_path,
        sst2_dir,
        "method=ffa_lora",
        "protocol.federated.aggregation=fedsvd",
        "protocol.federated.partition=dirichlet",
        "protocol.federated.dirichlet_alpha=5.0",
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    record, run_dir = _record(tmp_path)
    entry = record["protocol_report"]["history"][-1]
    assert entry["downlink_bytes"] > entry["uplink_bytes"]
    adapter = load_file(run_dir / "adapter.safetensors")  # the server's A is saved next to B
    peft = load_file(run_dir / "peft_adapter" / "adapter_model.safetensors")
    a_keys = [k for k in adapter if "lora_A" in k]
    assert a_keys
    for key in a_keys:
        a = adapter[key].double()
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=1e-5)
        peft_key = key.replace(".default.weight", ".weight")
        assert torch.equal(peft[peft_key], adapter[key])
    # the model rebuilt for export carries the re-factorised A, not the seed's
    from lorabench.export import load_run_model

    rebuilt = load_run_model(run_dir)
    params = dict(rebuilt.model.named_parameters())
    for key in a_keys:
        assert torch.equal(params[key].detach().cpu(), adapter[key])
    # the protocol's table reads the record: its numbers, one row, and the single-run table leaves it out
    from lorabench.results.table import build_table

    text, problems = build_table(tmp_path / "runs", "json", protocol="federated")
    (row,) = json.loads(text)
    assert not problems and row["method"] == "ffa_lora" and row["dataset"] == "sst2"
    assert row["final"]["mean"] == pytest.approx(100 * record["metrics"]["final"]["accuracy"])
    assert row["MB up/round"]["mean"] == pytest.approx(entry["uplink_bytes"] / 1e6)
    assert row["MB down/round"]["mean"] == pytest.approx(entry["downlink_bytes"] / 1e6)
    assert row["epsilon"]["n"] == 0  # no DP
    assert build_table(tmp_path / "runs", "json")[0].startswith("no completed records")
    # per-round curves: the global model's accuracy after every round
    from lorabench.cli import plot_command

    assert (
        plot_command(
            [
                "--results-dir",
                str(tmp_path / "runs"),
                "--out",
                str(tmp_path / "plots"),
                "--protocol",
                "federated",
                "--kind",
                "curves",
                "--format",
                "svg",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "plots" / "curves").glob("*.svg"))) == 1


@pytest.mark.parametrize("protocol", ["federated", "continual"])
def test_protocols_refuse_a_regularizer(protocol):
    from lorabench.config_store import compose
    from lorabench.validate import validate_config

    with pytest.raises(ConfigError, match=f"protocol={protocol} does not run regularizers yet"):
        validate_config(compose(["model=tiny_bert", "dataset=sst2", f"protocol={protocol}", "method=mgpo"]))
