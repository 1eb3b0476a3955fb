"""BA-LoRA's regularizer terms against numbers produced by running the authors' trainer
(tests/fixtures/parity/ba_lora.json, written by scripts/parity/ba_lora.py), and the regularizer in the
training loop: its terms enter the gradient and are logged apart from the task loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorabench.method_params.regularizers import BaLoraParams
from lorabench.methods.regularizers.ba_lora import ba_lora_terms

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "ba_lora.json").read_text())
UNIT = BaLoraParams(consistency_weight=1.0, diversity_weight=1.0, svd_weight=1.0)
CASES = {  # fixture case -> (head, fine logits, pretrained logits)
    "nlg_3d_logits": ("causal_lm", "fine_logits_3d_seed0", "pre_logits_3d_seed1"),
    "nlu_2d_logits": ("classification", "fine_logits_2d_nlu", "pre_logits_2d_nlu"),
}


def _logits(key: str) -> torch.Tensor:
    return torch.tensor(FIXTURE["inputs"][key], dtype=torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_terms_equal_the_authors_trainer(case):
    head, fine, pre = CASES[case]
    expected = FIXTURE["results"]["patched_svd_1d"][case]
    z = _logits(fine)
    ours = {name: value.item() for name, value in ba_lora_terms(z, _logits(pre), head, UNIT).items()}
    # our terms run in fp32 (bf16-safe); the reference's values are fp64
    assert ours["consistency"] == pytest.approx(expected["consistency_loss"], rel=1e-6)
    assert ours["diversity"] == pytest.approx(expected["diversity_loss"], rel=1e-6)
    assert ours["svd"] == pytest.approx(expected["svd_loss"], rel=1e-6)
    defaults = ba_lora_terms(z, _logits(pre), head, BaLoraParams())
    total = expected["task_loss"] + sum(v.item() for v in defaults.values())
    assert total == pytest.approx(expected["total_loss"], rel=1e-7)


def test_the_reference_svd_term_fails_as_its_fidelity_entry_says():
    """The deviation the fidelity entry states: the authors' SVD term raises on every input."""
    as_is = FIXTURE["results"]["as_is"]
    assert all("IndexError" in as_is[k]["error"] for k in ("nlg_3d_logits", "nlu_2d_logits"))


def test_terms_are_bf16_safe():
    """bf16 logits: the terms (computed in fp32) stay within 1% of the fp64 values."""
    head, fine, pre = CASES["nlg_3d_logits"]
    z, z0 = _logits(fine), _logits(pre)
    exact = ba_lora_terms(z, z0, head, UNIT)
    rounded = ba_lora_terms(z.bfloat16(), z0.bfloat16(), head, UNIT)
    for name in exact:
        assert rounded[name].dtype == torch.float32
        assert rounded[name].item() == pytest.approx(exact[name].item(), rel=1e-2)


def test_ba_lora_trains_in_the_loop_with_its_terms_logged(tmp_path, sst2_dir):
    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    code = train("method=ba_lora", *tiny_overrides("classification", sst2_dir, tmp_path), "train.log_every=1")
    assert code == 0
    record = json.loads((only_run_dir(tmp_path) / "record.json").read_text())
    assert record["status"] == "completed"
    terms = [entry["terms"] for entry in record["train_log"]]
    assert terms and all(set(t) == {"consistency", "diversity", "svd"} for t in terms)
    assert all(t["svd"] < 0 for t in terms)  # -share of the top-k singular values, times lambda3
    assert record["method_report"]["regularizer"]["variant"] == "nlu"
    assert record["method"]["regularizer"] == "ba_lora"
    assert record["method"]["fidelity"]["regularizer"]["status"] == "parity"


def test_ba_lora_refuses_the_losses_that_never_form_the_logits():
    from lorabench.config_store import compose
    from lorabench.errors import ConfigError
    from lorabench.validate import validate_config

    with pytest.raises(ConfigError, match="reads the model's logits: hardware.loss_chunk must be null"):
        validate_config(compose(["method=ba_lora", "model=tiny_llama", "dataset=gsm8k", "hardware.loss_chunk=8"]))
