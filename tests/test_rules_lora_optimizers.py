"""The builders of ALLoRA, LoRA-FA and LoRA+ on a bare peft LoRA model: hyper-parameter validation
names the key and value, the refusals say what to set, every lora_A / lora_B tensor gets ALLoRA's
scaling, and lr, weight decay, betas and eps reach every parameter group."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers.allora import ALLoRA, ALLoRAParams
from lorabench.methods.optimizers.lorafa import LoraFA
from lorabench.methods.optimizers.loraplus import LoraPlus, LoraPlusParams

LR, WD = 0.05, 0.03  # neither is a torch default, so a dropped argument shows


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.v(torch.tanh(self.q(x)))))


def lora_model(r: int = 2, alpha: float = 2, dropout: float = 0.0, **config) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        Net(), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q", "v"], **config)
    )
    for p in model.base_model.model.head.parameters():
        p.requires_grad_(True)
    return model


def ctx() -> MethodContext:
    return MethodContext(["q", "v"], "classification", lr=LR, weight_decay=WD, max_steps=10, seed=0)


def lora_tensors(model) -> set[int]:
    return {id(p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@pytest.mark.parametrize(
    "cls,params,message",
    [
        (ALLoRAParams, {"allora_eta": 0.0}, "method.allora_eta=0.0 is invalid; it must be > 0"),
        (ALLoRAParams, {"allora_norm": "column"}, "method.allora_norm='column' is invalid; valid choices: row, tensor"),
        (LoraPlusParams, {"loraplus_lr_ratio": -1.0}, "method.loraplus_lr_ratio=-1.0 is invalid; it must be > 0"),
    ],
)
def test_invalid_hyper_parameters_name_the_key_and_value(cls, params, message):
    with pytest.raises(ConfigError) as err:
        cls(**params)
    assert str(err.value) == message


# ----------------------------------------------------------------------------- ALLoRA


def test_allora_scales_every_lora_tensor_and_passes_the_settings():
    model = lora_model()
    opt = ALLoRA().build(model, ALLoRAParams(allora_eta=3.0, beta1=0.8, beta2=0.99, eps=1e-5), ctx())
    scaled = [g for g in opt.param_groups if g.get("allora")]
    assert len(scaled) == 1 and {id(p) for p in scaled[0]["params"]} == lora_tensors(model)
    assert scaled[0]["eta"] == 3.0 and scaled[0]["norm"] == "row"
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    for group in opt.param_groups:
        assert group["lr"] == LR and group["betas"] == (0.8, 0.99) and group["eps"] == 1e-5
    assert scaled[0]["weight_decay"] == WD


def test_allora_accepts_rslora_at_unit_scale():
    """rsLoRA scales by alpha / sqrt(r): alpha 2 at rank 4 is scale 1, which ALLoRA needs."""
    model = lora_model(r=4, alpha=2, use_rslora=True)
    opt = ALLoRA().build(model, ALLoRAParams(), ctx())
    assert any(g.get("allora") for g in opt.param_groups)


def test_allora_refusal_says_what_to_set():
    with pytest.raises(ConfigError) as err:
        ALLoRA().build(lora_model(r=2, alpha=4), ALLoRAParams(), ctx())
    assert str(err.value) == (
        "optimizer allora needs LoRA without dropout and without scaling: got dropout=0.0, alpha=4, rank=2 "
        "(scale 2), use_dora=False; set method.dropout=0 and method.alpha=method.rank"
    )


def test_allora_refuses_a_model_without_trainable_lora_tensors():
    model = lora_model()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            p.requires_grad_(False)
    with pytest.raises(ConfigError) as err:
        ALLoRA().build(model, ALLoRAParams(), ctx())
    assert str(err.value) == "optimizer allora found no trainable lora_A/lora_B tensors"


# ----------------------------------------------------------------------------- LoRA-FA


def freeze_a(model) -> nn.Module:
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            p.requires_grad_(False)
    return model


def test_lorafa_refuses_a_trainable_a_and_says_what_to_set():
    with pytest.raises(ConfigError) as err:
        LoraFA().build(lora_model(), None, ctx())
    assert str(err.value) == "optimizer lorafa freezes LoRA's A; set method.freeze_a=true so the adapter agrees"


def test_lorafa_refuses_dora():
    with pytest.raises(ConfigError) as err:
        LoraFA().build(freeze_a(lora_model(use_dora=True)), None, ctx())
    assert str(err.value) == "optimizer lorafa pairs lora_A/lora_B tensors and does not support DoRA (method.use_dora)"


# ----------------------------------------------------------------------------- LoRA+


def test_loraplus_passes_betas_and_eps_to_every_group():
    model = lora_model()
    opt = LoraPlus().build(model, LoraPlusParams(loraplus_lr_ratio=4.0, beta1=0.8, beta2=0.99, eps=1e-5), ctx())
    assert opt.param_groups and all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-5 for g in opt.param_groups)
    assert {LR, 4.0 * LR} <= {g["lr"] for g in opt.param_groups}  # A at lr, B at lr * ratio
