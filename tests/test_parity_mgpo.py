"""LoRA-MGPO's perturbation and gradient-norm average against numbers produced by running the
authors' trainer (tests/fixtures/parity/mgpo.json, written by scripts/parity/mgpo.py), and the
regularizer in the training loop."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorabench.method_params.regularizers import MgpoParams
from lorabench.methods.regularizers.mgpo import Mgpo

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "mgpo.json").read_text())
INPUTS = {k: torch.tensor(v, dtype=torch.float32) for k, v in FIXTURE["inputs"].items()}


def _module_with_lora():
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 5, bias=False))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"]), model)
    layer = model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(INPUTS["W0"])
        layer.lora_A["default"].weight.copy_(INPUTS["A"])
        layer.lora_B["default"].weight.copy_(INPUTS["B"])
    return model, layer


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: c["name"])
def test_perturbation_and_average_equal_the_authors_trainer(case):
    h = case["hparams"]
    params = MgpoParams(mgpo_rho=h["rho"], mgpo_beta=h["mgpo_beta"], mgpo_normalize=h["mgpo_normalize"])
    model, layer = _module_with_lora()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    optimizer = SimpleNamespace(state={a: {"exp_avg": INPUTS["m_A"].clone()}, b: {"exp_avg": INPUTS["m_B"].clone()}})
    reg = Mgpo()
    reg.setup(model, optimizer, params, ctx=None)
    weight = layer.base_layer.weight
    for step in case["steps"]:
        before = weight.detach().clone()
        reg.before_forward(model, step["step"])
        expected = torch.tensor(step["perturbation"], dtype=torch.float32)
        torch.testing.assert_close(weight.detach() - before, expected, rtol=1e-5, atol=1e-8)
        a.grad = torch.tensor(step["grads_fed_after_backward"]["g_A"], dtype=torch.float32)
        b.grad = torch.tensor(step["grads_fed_after_backward"]["g_B"], dtype=torch.float32)
        reg.after_backward(model, step["step"])
        assert torch.equal(weight, before)  # restored exactly
        assert reg.gbar["proj"] == pytest.approx(step["gbar_after_ema_update"], rel=1e-6)
    state = reg.state_dict()
    fresh = Mgpo()
    fresh.setup(model, optimizer, params, ctx=None)
    fresh.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert fresh.gbar == reg.gbar and fresh.perturbed_steps == 2


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_no_perturbation_before_the_optimizer_has_momentum():
    model, layer = _module_with_lora()
    reg = Mgpo()
    reg.setup(model, SimpleNamespace(state={}), MgpoParams(), ctx=None)
    before = layer.base_layer.weight.detach().clone()
    reg.before_forward(model, 0)
    assert torch.equal(layer.base_layer.weight, before) and reg.perturbed_steps == 0


def test_mgpo_trains_in_the_loop_and_leaves_the_base_weights_untouched(tmp_path, sst2_dir):
    from safetensors.torch import load_file

    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    code = train("method=mgpo", *tiny_overrides("classification", sst2_dir, tmp_path, "train.max_steps=3"))
    assert code == 0
    run_dir = only_run_dir(tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed"
    assert record["method_report"]["regularizer"]["perturbed_steps"] == 2  # steps 2 and 3 have momentum
    assert record["method"]["fidelity"]["regularizer"]["status"] == "parity"
    saved = load_file(str(run_dir / "adapter.safetensors")) if (run_dir / "adapter.safetensors").exists() else {}
    assert not any("base_layer" in k for k in saved)  # only the adapter was saved: the base stayed frozen
