"""Pin NLoRA, IntTune and SLoRA from the authors' code: writes tests/fixtures/parity/nlora.json.

    .venv/bin/python scripts/parity/nlora.py

Reference: TracyGuo2001/NLoRA at commit b66f88d7f94d0f8f077edd4a225f2c583d5be5d8, whose ``peft/`` folder
is a peft 0.13.3.dev0 fork: ``peft/src/peft/tuners/lora/layer.py`` holds the ``Linear`` layer with
the intermediate ``lora_N``, ``nlora_init`` (init_lora_weights='n_lora') and ``slora_init``
('s_lora'); ``inttune.py`` (repository root) freezes lora_A and lora_B after ``get_peft_model``.
Obtain it with the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive b66f88d7f94d0f8f077edd4a225f2c583d5be5d8 | tar -x -C /tmp/parity/nlora/src

(or point NLORA_SRC at another folder holding ``peft/src/peft``). The fork is imported in place of the
installed peft (this script imports nothing of lorabench).

The case (tests/parity_adapter_case.py): two seeded linear layers (12 x 10 and 10 x 12, with
bias) each wrapped by the fork's ``Linear`` (its base weight and bias frozen, as peft marks them;
IntTune also freezes lora_A and lora_B as inttune.py does), trained 12 steps with torch.optim.AdamW on
a seeded regression loss. SLoRA's random A and M come from torch's global generator seeded right
before each layer is built (recorded as the init that ours loads). Cases:
  * <method>_reference_defaults: the authors' argument defaults r = 8, lora_alpha = 8 (s = 1; their
    run scripts use 128/128, also s = 1), lr 2e-4, weight decay 0, AdamW's betas and eps;
  * <method>_preset: conf/method/<method>.yaml as it stands (rank, alpha, betas, eps), the
    leaderboard's lr (nlora 2e-3, inttune 2e-2, slora 5e-4), train.weight_decay 0;
  * nlora_scaled: r = 4, alpha = 16 (s = 4), lr 2e-3, weight decay 0.01, where s and the slices go.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_adapter_case import SHAPES, base_linears, train_layers  # noqa: E402
from tests.parity_case import write_fixture  # noqa: E402

COMMIT = "b66f88d7f94d0f8f077edd4a225f2c583d5be5d8"
SRC = Path(os.environ.get("NLORA_SRC", "/tmp/parity/nlora/src"))
INIT = {"nlora": "n_lora", "inttune": "n_lora", "slora": "s_lora"}
LEADERBOARD_LR = {"nlora": 2e-3, "inttune": 2e-2, "slora": 5e-4}
SLORA_SEED = 1234  # torch.manual_seed(SLORA_SEED + layer index) before each reference layer


def preset(method: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml"), resolve=True)


def cases() -> dict:
    adam = {"betas": [0.9, 0.999], "eps": 1e-8, "steps": 12}
    out = {}
    for method in ("nlora", "inttune", "slora"):
        out[f"{method}_reference_defaults"] = {
            "method": method,
            "rank": 8,
            "alpha": 8.0,
            "lr": 2e-4,
            "weight_decay": 0.0,
            **adam,
        }
        p = preset(method)
        out[f"{method}_preset"] = {
            "method": method,
            "rank": p["rank"],
            "alpha": float(p["alpha"]),
            "lr": LEADERBOARD_LR[method],
            "weight_decay": 0.0,
            "betas": [p["beta1"], p["beta2"]],
            "eps": p["eps"],
            "steps": 12,
        }
    out["nlora_scaled"] = {"method": "nlora", "rank": 4, "alpha": 16.0, "lr": 2e-3, "weight_decay": 0.01, **adam}
    return out


def fork_layer_class():
    if not (SRC / "peft" / "src" / "peft" / "tuners" / "lora" / "layer.py").is_file():
        sys.exit(f"the reference is absent: extract TracyGuo2001/NLoRA@{COMMIT[:12]} into {SRC} (see the docstring)")
    if "peft" in sys.modules:
        sys.exit("another peft is already imported; run this script on its own")
    sys.path.insert(0, str(SRC / "peft" / "src"))
    import peft
    from peft.tuners.lora.layer import Linear

    assert peft.__file__.startswith(str(SRC)), peft.__file__
    return Linear, peft.__version__


def factors(layer) -> dict:
    return {
        "B": layer.lora_B["default"].weight,
        "M": layer.lora_N["default"].weight,
        "A": layer.lora_A["default"].weight,
    }


def run_reference(linear_cls, case: dict) -> dict:
    layers = []
    for i, base in enumerate(base_linears()):
        if case["method"] == "slora":
            torch.manual_seed(SLORA_SEED + i)
        layer = linear_cls(
            base,
            "default",
            r=case["rank"],
            lora_alpha=case["alpha"],
            lora_dropout=0.0,
            init_lora_weights=INIT[case["method"]],
        )
        for name, p in layer.named_parameters():  # what peft's mark_only_adapters_as_trainable leaves
            p.requires_grad_("lora_" in name)
        if case["method"] == "inttune":  # inttune.py: only the r x r matrix is tuned
            layer.lora_A["default"].weight.requires_grad_(False)
            layer.lora_B["default"].weight.requires_grad_(False)
        layers.append(layer)
    w0 = [base.weight.detach().clone() for base in base_linears()]
    result = train_layers(layers, factors, lambda m: [p for p in m.parameters() if p.requires_grad], case)
    result["base_unchanged"] = all(torch.equal(m.base_layer.weight, w) for m, w in zip(layers, w0))
    if case["method"] != "slora":  # slices of W0: init_checksum pins them (the fixture stays small)
        del result["init"]
    return result


def main() -> None:
    linear_cls, version = fork_layer_class()
    out = {}
    for name, case in cases().items():
        out[name] = {"settings": case, **run_reference(linear_cls, case)}
        final = out[name]["final"][0]
        print(f"{name}: base unchanged {out[name]['base_unchanged']}, final M[0][0] {final['M'][0][0]:.6g}")
    path = write_fixture(
        "nlora",
        {
            "reference": f"TracyGuo2001/NLoRA@{COMMIT[:12]} peft/src/peft/tuners/lora/layer.py (peft {version} fork)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/nlora.py",
            "shapes": SHAPES,
            "slora_seed": SLORA_SEED,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
