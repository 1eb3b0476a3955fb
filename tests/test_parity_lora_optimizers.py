"""Parity of the adapter-side optimizers with their references.

LoRA-Pro: lorabench's ``LoraProAdamW`` against numbers pinned by running the released code
(mrflogs/LoRA-Pro@fe2602725b21, scripts/parity/lora_pro.py) on tests/parity_lora_case.py's LoRA
pairs. Tolerances: 1e-10 in float64 (with the delta the reference actually adds, the two agree to
~1e-15; the margin covers other LAPACK builds); 1e-5 in float32, because the closed form divides by
BᵀB + delta with a near-zero B, which multiplies rounding differences by up to ~1e3; the released
code verbatim (bf16 rounding of the squared gradient) is only checked to stay within 5e-2 on the
per-step checksums. LoRA+ and LoRA-FA call peft: the tests check that our builders give peft's own
optimizer (groups and 10 steps), so the pass-through of lr, ratio and weight decay is pinned.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers.lora_pro import LoraPro, LoraProAdamW
from lorabench.methods.optimizers.lorafa import LoraFA
from lorabench.methods.optimizers.loraplus import LoraPlus, LoraPlusParams
from tests.parity_case import checksum, load_fixture, max_trajectory_diff, parity_model, snapshot
from tests.parity_lora_case import lora_pairs, pair_max_abs_diff, run_pairs

LORA_PRO = load_fixture("lora_pro")
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
VERBATIM_TOLERANCE = 5e-2  # per-step checksums (sums of up to 192 entries) against the bf16-rounding code (1.1e-2)


def run_lora_pro(settings: dict, step_offset: int | None = None):
    dtype = getattr(torch, settings["dtype"])
    pairs = lora_pairs(dtype, settings["b_init"])
    if step_offset is None:  # ours is Adam's counting; 1 reproduces the released code's
        step_offset = int(settings["counting"] == "released")
    opt = LoraProAdamW(
        [{"params": [a, b], "pair_scale": settings["scale"]} for a, b in pairs],
        lr=settings["lr"],
        betas=tuple(settings["betas"]),
        eps=settings["eps"],
        weight_decay=settings["weight_decay"],
        mode="full",
        ridge=settings["ridge_as_used"],
        step_offset=step_offset,
    )
    trajectory = run_pairs(pairs, settings["scale"], opt.step, settings["steps"])
    return pairs, opt, trajectory


def test_lora_pro_fixture_is_the_released_code():
    assert LORA_PRO["version"] == "fe2602725b21f6b1c689462d73553f3e50b3d565"
    assert LoraPro.fidelity.status == "parity" and LoraPro.fidelity.fixture.endswith("lora_pro.json")


@pytest.mark.parametrize("name", [n for n, c in LORA_PRO["cases"].items() if not c["settings"]["bf16_cast"]])
def test_lora_pro_matches_the_released_code(name):
    case = LORA_PRO["cases"][name]
    settings = case["settings"]
    assert settings["steps"] >= 10
    pairs, opt, trajectory = run_lora_pro(settings)
    tol = TOLERANCE[settings["dtype"]]
    assert pair_max_abs_diff(pairs, case["final"]) <= tol
    assert max_trajectory_diff(trajectory, case["trajectory"]) <= 100 * tol  # sums of up to 192 entries
    # full mode: one m x n pair of moments per layer, as the reference's exp_avg[idx]
    shapes = {str(i): list(opt.state[b]["exp_avg"].shape) for i, (_, b) in enumerate(pairs)}
    assert shapes == case["moment_shapes"]


def test_lora_pro_released_code_verbatim_differs_only_by_its_bf16_rounding():
    case = LORA_PRO["cases"]["released_verbatim_fp32"]
    _, _, trajectory = run_lora_pro(case["settings"])
    assert max_trajectory_diff(trajectory, case["trajectory"]) <= VERBATIM_TOLERANCE


def test_lora_pro_counts_steps_as_adam_not_as_the_released_code():
    """The kept deviation: the released code's first bias correction uses t = 2."""
    case = LORA_PRO["cases"]["released_counting"]
    pairs, _, _ = run_lora_pro(case["settings"], step_offset=0)
    assert pair_max_abs_diff(pairs, case["final"]) > 1e-4


# ----------------------------------------------------------------------------- LoRA+ and LoRA-FA (peft)


def _peft_mlp(**lora):
    """tests/parity_case.py's MLP with peft LoRA on its four linear layers (biases trainable too)."""
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["0", "2", "4", "6"], **lora)
    return get_peft_model(parity_model(), config)


def _ctx(lr: float, weight_decay: float) -> MethodContext:
    return MethodContext(["0", "2", "4", "6"], "classification", lr, weight_decay, 10, 0)


def _groups(opt) -> list[tuple]:
    return [
        (g["lr"], g["weight_decay"], g.get("betas"), g.get("eps"), [id(p) for p in g["params"]])
        for g in opt.param_groups
    ]


def _feed(model, opt, steps: int) -> list[dict]:
    """Seeded gradients on the trainable tensors only, ``steps`` optimizer steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    trajectory = []
    for _ in range(steps):
        for p in trainable:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trajectory.append(checksum(model))
    return trajectory


def _same_trajectory(model_a, opt_a, model_b, opt_b, steps: int = 10) -> None:
    before = snapshot(model_a)
    assert max_trajectory_diff(_feed(model_a, opt_a, steps), _feed(model_b, opt_b, steps)) == 0.0
    assert snapshot(model_a) == snapshot(model_b) != before


def test_loraplus_is_peft_s_optimizer_with_our_settings():
    lr, wd, params = 1e-3, 0.1, LoraPlusParams()
    ours_model, ref_model = _peft_mlp(bias="all"), _peft_mlp(bias="all")
    ours = LoraPlus().build(ours_model, params, _ctx(lr, wd))
    ref = create_loraplus_optimizer(
        ref_model,
        torch.optim.AdamW,
        lr=lr,
        loraplus_lr_ratio=16.0,
        loraplus_weight_decay=wd,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    by_name = {n: p for n, p in ours_model.named_parameters() if p.requires_grad}
    lr_of = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for n, p in by_name.items() if ".lora_A." in n} == {lr}
    assert {lr_of[id(p)] for n, p in by_name.items() if ".lora_B." in n or p.ndim == 1} == {16 * lr}
    names = {id(p): n for n, p in by_name.items()}
    ref_names = {id(p): n for n, p in ref_model.named_parameters()}
    assert any(p.ndim == 1 for p in by_name.values())  # biases: peft gives them B's lr
    assert [(g[0], g[1], g[2], g[3], [names[i] for i in g[4]]) for g in _groups(ours)] == [
        (g[0], g[1], g[2], g[3], [ref_names[i] for i in g[4]]) for g in _groups(ref)
    ]
    _same_trajectory(ours_model, ours, ref_model, ref)


def test_lorafa_is_peft_s_optimizer_with_our_settings():
    lr, wd = 1e-3, 0.1
    ours_model, ref_model = _peft_mlp(), _peft_mlp()
    for model in (ours_model, ref_model):  # method.freeze_a, as the preset sets it
        for n, p in model.named_parameters():
            if ".lora_A." in n:
                p.requires_grad_(False)
    ours = LoraFA().build(ours_model, None, _ctx(lr, wd))
    ref = create_lorafa_optimizer(ref_model, r=8, lora_alpha=16, lr=lr, weight_decay=wd)
    assert type(ours) is type(ref)
    assert [g["scaling_factors"] for g in ours.param_groups] == [g["scaling_factors"] for g in ref.param_groups]
    assert {(g["lr"], g["weight_decay"]) for g in ours.param_groups} == {(lr, wd)}
    assert math.isclose(ours.param_groups[0]["scaling_factor"], 2.0)
    _same_trajectory(ours_model, ours, ref_model, ref)
