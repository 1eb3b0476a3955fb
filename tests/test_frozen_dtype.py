"""``hardware.frozen_dtype=bfloat16`` (lorabench.frozen_dtype): the frozen base's Linear weights are
stored in bf16 once. Under bf16 autocast that is what every matmul computed with anyway, so a LoRA
run's losses equal the autocast run's; adapters, their optimizer state, embeddings (tied LM head
included) and norms stay float32; bad combinations are refused before any weight loads; an export
rebuilds the rounded base."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.frozen_dtype import store_frozen_linears
from tests.conftest import tiny_overrides
from tests.test_resume import only_run_dir, train

BF16 = ("hardware.mixed_precision=bf16",)


def _losses(run_dir) -> list[float]:
    record = json.loads((run_dir / "record.json").read_text())
    return [entry["loss"] for entry in record["train_log"]], record


def _run(tmp_path, gsm8k_dir, *extra):
    args = tiny_overrides("causal_lm", gsm8k_dir, tmp_path, "train.max_steps=4", "train.log_every=1", *extra)
    assert train("method=lora", *args) == 0
    return _losses(only_run_dir(tmp_path))


def test_lora_with_a_bf16_base_trains_as_bf16_autocast_does(gsm8k_dir, tmp_path):
    autocast, _ = _run(tmp_path / "autocast", gsm8k_dir, *BF16)
    stored, record = _run(tmp_path / "stored", gsm8k_dir, *BF16, "hardware.frozen_dtype=bfloat16")
    assert len(stored) == 4
    assert stored == autocast  # bitwise: autocast rounds each fp32 weight to the bf16 value stored here
    assert record["hardware"]["frozen_dtype"] == "bfloat16"
    assert record["cost"]["frozen_cast_params"] > 0
    fp32, plain = _run(tmp_path / "fp32", gsm8k_dir)
    assert "frozen_cast_params" not in plain["cost"]
    assert stored != fp32 and stored == pytest.approx(fp32, rel=2e-2)


def test_only_frozen_base_linears_are_cast():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10))
    model[3].weight = model[0].weight  # a tied LM head
    model[1].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    adapter = nn.Linear(4, 4)
    adapter.weight.requires_grad_(False)
    model.append(adapter)  # created by the method: not one of the loaded model's parameters
    base = {id(p) for name, p in model.named_parameters() if not name.startswith("4.")}
    cast = store_frozen_linears(model, "bfloat16", base)
    assert cast == 16
    assert model[1].weight.dtype == torch.bfloat16 and model[1].bias.dtype == torch.float32
    assert model[0].weight.dtype == model[2].weight.dtype == adapter.weight.dtype == torch.float32
    assert store_frozen_linears(model, "float32", base) == 0


def test_rounding_in_float32_keeps_the_values_of_the_bf16_storage():
    layer = nn.Linear(8, 8).requires_grad_(False)
    expected = layer.weight.detach().to(torch.bfloat16).float()
    store_frozen_linears(layer, "bfloat16", keep_float32=True)
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("method=lora", "hardware.frozen_dtype=bfloat16"), "needs hardware.mixed_precision=bf16"),
        (("method=full", "hardware.frozen_dtype=bfloat16", *BF16), "this method has no adapter"),
        (("method=lisa", "hardware.frozen_dtype=bfloat16", *BF16), "this method has no adapter"),
        (("method=lora", "hardware.frozen_dtype=float16", *BF16), "hardware.frozen_dtype"),
        (("method=lora", "hardware.frozen_dtype=bfloat16", "analysis.forgetting=true", *BF16), "analysis.forgetting"),
    ],
)
def test_bad_combinations_are_refused_before_loading(extra, message, gsm8k_dir, tmp_path):
    from lorabench.config_store import compose
    from lorabench.validate import validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(compose([*tiny_overrides("causal_lm", gsm8k_dir, tmp_path), *extra]))


def test_an_export_rebuilds_the_rounded_base(gsm8k_dir, tmp_path):
    from lorabench.export import load_run_model

    args = tiny_overrides("causal_lm", gsm8k_dir, tmp_path, *BF16, "hardware.frozen_dtype=bfloat16")
    assert train("method=lora", *args) == 0
    rebuilt = load_run_model(only_run_dir(tmp_path))
    q = rebuilt.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer.weight
    assert q.dtype == torch.float32 and torch.equal(q, q.to(torch.bfloat16).float())
