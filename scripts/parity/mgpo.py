"""Pin LoRA-MGPO's perturbation and gradient-norm average from the authors' trainer: writes
tests/fixtures/parity/mgpo.json.

    MGPO_SRC=/tmp/parity/mgpo/src .venv/bin/python scripts/parity/mgpo.py

Reference: llm172/LoRA-MGPO (formerly llm172/LoRA-GGPO) at commit
b45656c240fce91b55ac3f6c3952a0ebcf536a5f, ``lora_mgpo/trainer.py`` (``LoraMGPOTrainer``: its
``_apply_mgpo_perturbation``, ``_remove_mgpo_perturbation`` and ``_update_gradient_ema``). Obtain it
with the ``fetch`` tool (or git) and extract it so that ``<MGPO_SRC>/lora_mgpo/trainer.py`` exists:

    git --git-dir=<mirror> archive b45656c240fce91b55ac3f6c3952a0ebcf536a5f lora_mgpo | tar -x -C /tmp/parity/mgpo/src

The trainer's methods run on a real peft ``lora.Linear`` (6 -> 5, r 2, alpha 4) with a stand-in
optimizer whose state holds given AdamW first moments; two steps per case: apply, (forward and
backward), remove, then the gradient-norm average from given gradients.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

SRC = os.environ.get("MGPO_SRC", "/tmp/parity/mgpo/src")
sys.path.insert(0, SRC)
OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "mgpo.json"
torch.set_num_threads(1)

from lora_mgpo.trainer import LoraMGPOTrainer  # noqa: E402  (from MGPO_SRC)
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402


def L(t):
    return t.detach().double().tolist()


D_IN, D_OUT, R, ALPHA = 6, 5, 2, 4  # scaling = alpha / r = 2.0


def inputs():
    torch.manual_seed(0)
    A = torch.randn(R, D_IN)
    B = torch.randn(D_OUT, R)
    torch.manual_seed(1)
    gA = torch.randn(R, D_IN)
    gB = torch.randn(D_OUT, R)
    torch.manual_seed(2)
    mA = torch.randn(R, D_IN)
    mB = torch.randn(D_OUT, R)
    torch.manual_seed(3)
    W0 = torch.randn(D_OUT, D_IN)
    torch.manual_seed(4)
    gA2 = torch.randn(R, D_IN)
    gB2 = torch.randn(D_OUT, R)
    return dict(A=A, B=B, g_A=gA, g_B=gB, m_A=mA, m_B=mB, W0=W0, g_A_step2=gA2, g_B_step2=gB2)


def make_peft_module(I):
    base = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(I["W0"])
    from peft import LoraConfig

    mod = LoraLinear(
        base, adapter_name="default", config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0), r=R, lora_alpha=ALPHA
    )
    with torch.no_grad():
        mod.lora_A["default"].weight.copy_(I["A"])
        mod.lora_B["default"].weight.copy_(I["B"])
    return mod


class FakeOpt:  # only .state is read by the official code (exp_avg == AdamW first moment)
    def __init__(self):
        self.state = {}


def mgpo_case(name, rho, beta, normalize, grad_mult, eps=1e-12):
    I = inputs()
    mod = make_peft_module(I)
    model = nn.Sequential(mod)
    t = LoraMGPOTrainer.__new__(LoraMGPOTrainer)  # bypass HF Trainer.__init__
    t.rho, t.mgpo_beta, t.mgpo_eps, t.mgpo_normalize = float(rho), float(beta), float(eps), bool(normalize)
    t._mgpo_grad_ema, t._mgpo_active_modules = {}, []
    t._mgpo_last_stats = {"layers": 0, "mean_scale": 0.0, "mean_norm": 0.0}
    pA, pB = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    t.optimizer = FakeOpt()
    t.optimizer.state[pA] = {"exp_avg": I["m_A"].clone()}
    t.optimizer.state[pB] = {"exp_avg": I["m_B"].clone()}
    steps = []
    grads = [(I["g_A"] * grad_mult, I["g_B"] * grad_mult), (I["g_A_step2"] * grad_mult, I["g_B_step2"] * grad_mult)]
    for k, (gA, gB) in enumerate(grads):
        gbar_before = t._mgpo_grad_ema.get(id(mod))
        W_before = mod.weight.detach().clone()
        t._apply_mgpo_perturbation(model)
        W_pert = mod.weight.detach().clone()
        stats = dict(t._mgpo_last_stats)
        # (forward/backward would happen here, at W_pert)
        t._remove_mgpo_perturbation()
        W_rest = mod.weight.detach().clone()
        pA.grad, pB.grad = gA.clone(), gB.clone()  # gradient of this step's backward
        t._update_gradient_ema(model)
        steps.append(
            dict(
                step=k + 1,
                gbar_before_apply=None if gbar_before is None else float(gbar_before),
                adaptive_scale=stats["mean_scale"],
                direction_norm=stats["mean_norm"],
                W_base_before=L(W_before),
                W_base_perturbed=L(W_pert),
                perturbation=L(W_pert - W_before),
                W_base_restored=L(W_rest),
                restore_max_abs_err=float((W_rest - W_before).abs().max()),
                A_after=L(pA),
                B_after=L(pB),
                grads_fed_after_backward=dict(g_A=L(gA), g_B=L(gB)),
                gbar_after_ema_update=float(t._mgpo_grad_ema[id(mod)]),
            )
        )
    return dict(
        name=name,
        family="mgpo_official",
        hparams=dict(
            rho=rho,
            mgpo_beta=beta,
            mgpo_eps=eps,
            mgpo_normalize=normalize,
            adaptive_scale_clamp_max=10.0,
            lora_r=R,
            lora_alpha=ALPHA,
            scaling=ALPHA / R,
            grad_multiplier_applied_to_inputs=grad_mult,
            note_mu="profile mu is AdamW beta1 (only affects how exp_avg is built; exp_avg given directly here)",
        ),
        noise=None,
        steps=steps,
    )


if __name__ == "__main__":
    I = inputs()
    sha = hashlib.sha256(open(SRC + "/lora_mgpo/trainer.py", "rb").read()).hexdigest()
    cases = [
        mgpo_case("mgpo_nlu_default", rho=0.05, beta=0.9, normalize=True, grad_mult=1.0),
        mgpo_case("mgpo_nlg_small_grads_clamp", rho=0.01, beta=0.8, normalize=True, grad_mult=0.001),
        mgpo_case("mgpo_nlu_no_normalize", rho=0.05, beta=0.9, normalize=False, grad_mult=1.0),
    ]
    out = dict(
        reference=dict(
            repo="llm172/LoRA-MGPO (formerly llm172/LoRA-GGPO)",
            path="lora_mgpo/trainer.py",
            commit="b45656c240fce91b55ac3f6c3952a0ebcf536a5f",
            file_sha256=sha,
            note="the repository holds the second version (MGPO) only; no code of GGPO v1 was found",
        ),
        seeds=dict(A_then_B=0, gA_then_gB=1, mA_then_mB=2, W0=3, gA2_then_gB2=4),
        inputs={k: L(v) for k, v in I.items()},
        cases=cases,
    )
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    for c in cases:
        print(
            c["name"], [(s["adaptive_scale"], s["restore_max_abs_err"], s["gbar_after_ema_update"]) for s in c["steps"]]
        )
