"""LoRA-Pro's optimizer and builder on a bare peft LoRA model: the optimizer's defaults (Adam eps 1e-8,
no weight decay, full mode with m x n moments), validation messages, which pairs it adjusts, and the
weight decay, betas, eps and ridge every group gets."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers.lora_pro import LoraPro, LoraProAdamW, LoraProParams, lora_pairs
from tests.test_rules_lora_optimizers import LR, WD, Net  # the same bare three-linear model


def lora_model(**config) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], **config))
    for p in model.base_model.model.head.parameters():
        p.requires_grad_(True)
    return model


def ctx() -> MethodContext:
    return MethodContext(["q", "v"], "classification", lr=LR, weight_decay=WD, max_steps=10, seed=0)


def feed(params, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    return grads


def test_plain_groups_default_to_adamw_without_decay_and_eps_1e8():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt, ref_opt = LoraProAdamW([{"params": ours}], lr=LR), torch.optim.AdamW(ref, lr=LR, eps=1e-8, weight_decay=0)
    for grads in feed(ours, 4):
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone() * 1e-6, g.clone() * 1e-6  # small gradients: eps matters
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-7, rtol=1e-6)


def test_default_mode_is_full_with_moments_of_the_equivalent_gradient():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(4, 2))
    opt = LoraProAdamW([{"params": [a, b], "pair_scale": 2.0}], lr=LR)
    a.grad, b.grad = torch.randn(2, 5), torch.randn(4, 2)
    opt.step()
    assert opt.mode == "full" and opt.state[b]["exp_avg"].shape == (4, 5) and not opt.state[a]


def test_an_unknown_mode_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError) as err:
        LoraProAdamW([{"params": [nn.Parameter(torch.zeros(2))]}], lr=LR, mode="fast")
    assert str(err.value) == "mode='fast' is invalid; valid: full, efficient"


@pytest.mark.parametrize(
    "params,message",
    [
        ({"lora_pro_mode": "fast"}, "method.lora_pro_mode='fast' is invalid; valid choices: full, efficient"),
        ({"lora_pro_ridge": 0.0}, "method.lora_pro_ridge=0.0 is invalid; it must be > 0"),
    ],
)
def test_invalid_hyper_parameters_name_the_key_and_value(params, message):
    with pytest.raises(ConfigError) as err:
        LoraProParams(**params)
    assert str(err.value) == message


def test_pairs_need_both_factors_trainable():
    model = lora_model()
    model.base_model.model.q.lora_A["default"].weight.requires_grad_(False)
    pairs = lora_pairs(model)
    assert [b for _, b, _ in pairs] == [model.base_model.model.v.lora_B["default"].weight]
    assert pairs[0][2] == 2.0  # alpha / r


def test_build_refuses_a_model_without_a_trainable_pair():
    model = lora_model()
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            p.requires_grad_(False)
    with pytest.raises(ConfigError) as err:
        LoraPro().build(model, LoraProParams(), ctx())
    assert str(err.value) == "optimizer lora_pro found no trainable lora_A/lora_B pair (is method.freeze_a set?)"


def test_build_refuses_dora():
    with pytest.raises(ConfigError) as err:
        LoraPro().build(lora_model(use_dora=True), LoraProParams(), ctx())
    assert (
        str(err.value) == "optimizer lora_pro pairs lora_A/lora_B tensors and does not support DoRA (method.use_dora)"
    )


def test_build_passes_decay_betas_eps_and_ridge():
    model = lora_model()
    params = LoraProParams(lora_pro_mode="efficient", lora_pro_ridge=1e-4, beta1=0.8, beta2=0.99, eps=1e-5)
    opt = LoraPro().build(model, params, ctx())
    head = model.base_model.model.head
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(head.weight)] == WD and decay[id(head.bias)] == 0.0
    pair_groups = [g for g in opt.param_groups if g["pair_scale"] is not None]
    assert len(pair_groups) == 2 and all(g["weight_decay"] == WD for g in pair_groups)
    assert all(g["lr"] == LR and g["betas"] == (0.8, 0.99) and g["eps"] == 1e-5 for g in opt.param_groups)
    assert opt.mode == "efficient" and opt.ridge == 1e-4
