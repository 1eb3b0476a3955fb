"""PEGO's orthogonality loss against numbers produced by running the authors' code
(tests/fixtures/parity/pego.json, written by scripts/parity/pego.py): the loss and its gradient with
respect to every member of the group, with the group held as one split peft LoRA; and the
regularizer in the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorabench.methods.regularizers.pego import group_terms

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "pego.json").read_text())
SETTINGS = FIXTURE["settings"]
N, D = SETTINGS["lora_nums"], SETTINGS["dim"]
PREFIX = "lora_vit.transformer.resblocks.{layer}.attn.qkv."


def _tensor(key: str) -> torch.Tensor:
    return torch.tensor(FIXTURE["inputs"]["state_dict_float32"][key], dtype=torch.float32)


def _layers():
    """(layer, projection, W, A stacked by rows, B stacked by columns) in our layout."""
    for layer in range(SETTINGS["layers"]):
        prefix = PREFIX.format(layer=layer)
        qkv = _tensor(prefix + "qkv.weight")
        for proj, weight in (("q", qkv[:D]), ("v", qkv[-D:])):
            a = torch.cat([_tensor(f"{prefix}linear_a_{proj}.{i}.weight") for i in range(N)], dim=0)
            b = torch.cat([_tensor(f"{prefix}linear_b_{proj}.{i}.weight") for i in range(N)], dim=1)
            yield layer, proj, weight, a.requires_grad_(), b.requires_grad_()


def test_loss_and_gradients_equal_the_authors_code():
    layers = list(_layers())
    total = sum(sum(group_terms(w, a, b, N, 1.0)) for _, _, w, a, b in layers)
    expected = FIXTURE["outputs"]["float32"]
    assert total.item() == pytest.approx(expected["loss_o_ld1"], rel=1e-6)
    total.backward()
    grads = expected["grad_ld1"]
    r = SETTINGS["rank"]
    for layer, proj, _, a, b in layers:
        prefix = PREFIX.format(layer=layer)
        for i in range(N):
            ref_a = torch.tensor(grads[f"{prefix}linear_a_{proj}.{i}.weight"])
            ref_b = torch.tensor(grads[f"{prefix}linear_b_{proj}.{i}.weight"])
            torch.testing.assert_close(a.grad[i * r : (i + 1) * r], ref_a, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(b.grad[:, i * r : (i + 1) * r], ref_b, rtol=1e-5, atol=1e-4)


def test_one_member_is_the_preserve_term_alone_and_zero_b_gives_zero():
    layers = list(_layers())
    single = sum(group_terms(w, a[: SETTINGS["rank"]], b[:, : SETTINGS["rank"]], 1, 1.0)[0] for *_, w, a, b in layers)
    assert single.item() == pytest.approx(
        FIXTURE["outputs"]["float32"]["loss_o_ld1_lora_nums1 (preserve term of lora0 only)"], rel=1e-6
    )
    _, _, w, a, b = layers[0]
    assert all(t.item() == 0 for t in group_terms(w, a, torch.zeros_like(b), N, 1.0))
    assert FIXTURE["outputs"]["official_init_loss_o_ld1"] == 0.0


def test_pego_refuses_a_rank_the_group_cannot_split():
    from lorabench.config_store import compose
    from lorabench.errors import ConfigError
    from lorabench.validate import validate_config

    with pytest.raises(ConfigError, match="method.rank=7 is invalid for method.pego_groups=2"):
        validate_config(compose(["method=pego", "method.rank=7"]))


def test_pego_trains_in_the_loop_with_both_terms_logged(tmp_path, sst2_dir):
    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    code = train(
        "method=pego", *tiny_overrides("classification", sst2_dir, tmp_path, "train.max_steps=3"), "train.log_every=1"
    )
    assert code == 0
    record = json.loads((only_run_dir(tmp_path) / "record.json").read_text())
    assert record["status"] == "completed"
    terms = [entry["terms"] for entry in record["train_log"]]
    assert terms[0] == {"preserve": 0.0, "diversify": 0.0}  # B = 0 at the start
    assert terms[-1]["preserve"] > 0 and terms[-1]["diversify"] > 0
    assert record["method_report"]["regularizer"]["groups"] == 2
