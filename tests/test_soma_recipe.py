"""SoMA's recipe (arXiv:2412.04077; ysj9909/SoMA): no adapters in the first K transformer blocks
(adapter option ``freeze_first_blocks`` / ``freeze_first_fraction``) and the cosine-annealed weight
decay of the ``soma_wd`` procedure, combined in the ``soma_recipe`` preset."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorabench.checkpoint import list_checkpoints
from lorabench.errors import ConfigError
from lorabench.methods.adapters.layer import adapter_layers, target_shapes
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.methods.procedures.lisa import transformer_layers
from tests.method_harness import build, train_with_procedure
from tests.test_resume import run_pair


def make(method, data_dir, tmp, *extra, kind="classification"):
    _, spec, loaded, loader, ctx = build(method, data_dir, tmp, *extra, kind=kind)
    base = copy.deepcopy(loaded.model)
    expected = expected_trainable(base, spec, ctx)
    built = apply_method(loaded.model, spec, ctx)
    return base, built, next(iter(loader)), spec, ctx, expected


def cosine(t: int, total: int, start: float = 0.05, end: float = 1e-5) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * t / total)) / 2


def block_index(name: str, list_name: str) -> int | None:
    rest = name[len(list_name) + 1 :] if name.startswith(list_name + ".") else None
    return int(rest.split(".")[0]) if rest else None


@pytest.mark.parametrize(
    "method,extra,kind",
    [
        ("soma", ["+method.freeze_first_blocks=1"], "classification"),
        ("soma", ["+method.freeze_first_blocks=1"], "causal_lm"),
        ("soma_recipe", [], "classification"),  # K = round(2 / 3) = 1 on the 2-block tiny model
        ("soma", [], "classification"),  # the plain preset: K = 0, adapters everywhere
    ],
    ids=["bert-K1", "llama-K1", "recipe", "soma-K0"],
)
def test_first_blocks_have_no_adapters(method, extra, kind, sst2_dir, gsm8k_dir, tmp_path):
    data = sst2_dir if kind == "classification" else gsm8k_dir
    base, built, _, spec, ctx, expected = make(method, data, tmp_path, *extra, kind=kind)
    k = 0 if method == "soma" and not extra else 1
    list_name, blocks = transformer_layers(base)
    assert len(blocks) == 2
    layers = adapter_layers(built.model)
    assert layers and all(block_index(n, list_name) >= k for n in layers)
    targets = target_shapes(base, ctx.target_modules)
    kept = [(n, o, i) for n, o, i in targets if block_index(n, list_name) >= k]
    assert sorted(layers) == sorted(n for n, _, _ in kept)
    assert (len(kept) < len(targets)) == (k > 0)
    # nothing in the frozen blocks trains; trainable count = r (d_in + d_out) per kept target + head
    trainable = {n: p.numel() for n, p in built.model.named_parameters() if p.requires_grad}
    assert not any(block_index(n, list_name) is not None and block_index(n, list_name) < k for n in trainable)
    r = spec.params["adapter"].rank
    head = sum(p.numel() for n, p in base.named_parameters() if n.split(".")[0] in ("classifier", "score"))
    formula = sum(r * (i + o) for _, o, i in kept) + (head if kind == "classification" else 0)
    assert sum(trainable.values()) == formula == expected


def test_weight_decay_follows_the_cosine_schedule(sst2_dir, tmp_path):
    total = 8
    _, built, batch, _, _, _ = make("soma_recipe", sst2_dir, tmp_path, f"train.max_steps={total}")
    opt, proc = built.optimizer, built.procedure
    groups = [(g, all(p.ndim >= 2 for p in g["params"])) for g in opt.param_groups]
    assert any(d for _, d in groups) and any(not d for _, d in groups)

    def check(t):
        for g, decays in groups:
            assert g["weight_decay"] == (pytest.approx(cosine(t, total), rel=1e-12, abs=0) if decays else 0.0)

    check(0)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    for n in (1, 2, 4, 7, 8):
        proc.on_step_end(n)
        check(n)
    assert cosine(4, total) == pytest.approx((0.05 + 1e-5) / 2)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-5)  # wd(T) = end
    state = proc.state()
    assert state["soma_wd_last"] == pytest.approx(cosine(total - 1, total))
    assert state["soma_frozen_blocks"] == [0] and state["soma_num_blocks"] == 2
    assert state["soma_wd_start"] == 0.05 and state["soma_wd_end"] == 1e-5


def test_decay_acts_on_minor_factors_and_head_weight_only(sst2_dir, tmp_path):
    """One AdamW step with zero gradients: only decoupled decay moves the parameters,
    p <- p (1 - lr wd(0)) on >= 2-D trainable tensors (B, A, head weight); 1-D and frozen stay."""
    lr = 0.5
    _, built, _, _, _, _ = make("soma_recipe", sst2_dir, tmp_path, f"method.lr={lr}")
    model = built.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    built.optimizer.step()
    factor = 1 - lr * 0.05
    decayed = 0
    for n, p in model.named_parameters():
        if p.requires_grad and p.ndim >= 2:
            torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=1e-7)
            assert not torch.equal(p.detach(), before[n]), n
            decayed += 1
        else:
            assert torch.equal(p.detach(), before[n]), n
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    assert decayed == len(names) and any("lora_B" in n for n in names) and any("lora_A" in n for n in names)
    assert any(n.startswith("classifier") for n in names)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["+method.freeze_first_blocks=2"], "method.freeze_first_blocks=2 is invalid"),
        (["+method.freeze_first_blocks=5"], "K must be in 0..1"),
        (["+method.freeze_first_fraction=0.9"], "method.freeze_first_fraction=0.9 (K = 2)"),
    ],
)
def test_too_many_frozen_blocks_is_an_error(extra, message, sst2_dir, tmp_path):
    with pytest.raises(ConfigError) as exc:
        make("soma", sst2_dir, tmp_path, *extra)
    assert message in str(exc.value) and "2 transformer blocks" in str(exc.value)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["+method.freeze_first_blocks=-1"], "method.freeze_first_blocks=-1 is invalid"),
        (["+method.freeze_first_fraction=1.0"], "method.freeze_first_fraction=1.0 is invalid"),
        (["+method.freeze_first_blocks=1", "+method.freeze_first_fraction=0.5"], "set only one of them"),
    ],
)
def test_invalid_freeze_values_are_config_errors(extra, message, sst2_dir, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build("soma", sst2_dir, tmp_path, *extra)


def test_invalid_schedule_is_a_config_error(sst2_dir, tmp_path):
    with pytest.raises(ConfigError, match="soma_wd_end"):
        build("soma_recipe", sst2_dir, tmp_path, "method.soma_wd_end=0.1")


def test_procedure_state_survives_a_checkpoint(sst2_dir, tmp_path):
    """state_dict -> JSON -> load_state_dict on a fresh build (with its optimizer state loaded, which
    replaces the param-group dicts) gives the same weight decay and state."""
    total = 8
    _, built, batch, _, _, _ = make("soma_recipe", sst2_dir, tmp_path, f"train.max_steps={total}")
    proc = built.procedure
    train_with_procedure(built, batch, 3)
    state = json.loads(json.dumps(proc.state_dict()))
    _, fresh, _, _, _, _ = make("soma_recipe", sst2_dir, tmp_path, f"train.max_steps={total}")
    fresh.optimizer.load_state_dict(built.optimizer.state_dict())
    fresh.procedure.load_state_dict(state)
    assert fresh.procedure.state() == proc.state() and fresh.procedure.state_dict() == state == {"step": 3}
    assert [g["weight_decay"] for g in fresh.optimizer.param_groups] == [
        g["weight_decay"] for g in built.optimizer.param_groups
    ]
    fresh.procedure.on_step_end(4)
    assert fresh.optimizer.param_groups[0]["weight_decay"] == pytest.approx(cosine(4, total))


def test_resume_is_bitwise_equal_and_recorded(sst2_dir, tmp_path, monkeypatch):
    a_dir, b_dir = run_pair("soma_recipe", sst2_dir, tmp_path, monkeypatch)
    a, b = (json.loads((d / "record.json").read_text()) for d in (a_dir, b_dir))
    assert b["status"] == "completed" and b["resumed_from"][0]["step"] == 3
    assert a["history"] == b["history"] and a["train_log"] == b["train_log"]
    assert a["metrics"]["final"] == b["metrics"]["final"]
    for rec in (a, b):
        report = rec["method_report"]
        assert report["soma_frozen_blocks"] == [0] and report["soma_wd_steps"] == 6
        assert report["soma_wd_last"] == pytest.approx(cosine(5, 6))
    wa = load_file(str(list_checkpoints(a_dir)[-1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(b_dir)[-1] / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and not any(".layer.0." in n for n in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
