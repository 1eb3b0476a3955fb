"""Pin SoMA's minor-component layer from the authors' code: writes tests/fixtures/parity/soma.json.

    .venv/bin/python scripts/parity/soma.py

Reference: ysj9909/SoMA at commit 7ea8c0e7c2ac64afe84a7db52d41e69bed5d5764, ``rein/peft/sora.py``: the
``Linear`` layer (an ``nn.Linear`` with lora_A / lora_B) and its ``sora_init`` (full SVD in float32, the
r smallest triplets, S_min / s split as sqrt into both factors, the residual W0 - s B A written into the
weight). Obtain it with the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive 7ea8c0e7c2ac64afe84a7db52d41e69bed5d5764 rein configs \
        | tar -x -C /tmp/parity/soma/src

(or point SOMA_SRC at another folder holding ``rein/peft/sora.py``). Only that file is loaded (the
``rein`` package imports mmseg); it needs ``peft.utils.integrations`` (the installed peft).

The case (tests/parity_adapter_case.py): two seeded linear layers (24 x 20 and 20 x 24, with bias), each
built as the authors' ``SoraModel._replace_module`` does (the new layer takes the old weight and bias),
``sora_init("sora")``, then trained 12 steps with torch.optim.AdamW on a seeded regression loss; lora_A
and lora_B train, the bias stays frozen on both sides (the authors' bias="all" trains it: a kept
deviation of ours). Cases:
  * reference_config: the released configs (configs/sora/*.py): r 16, lora_alpha = r, first_eigen
    False, dropout 0; AdamW lr 1e-4 x the backbone's lr_mult 0.5, weight decay 0.05 (held constant:
    its cosine annealing is the soma_wd procedure), betas (0.9, 0.999), eps 1e-8;
  * preset: conf/method/soma.yaml as it stands (rank, alpha, betas, eps), lr 5e-4 (the leaderboard's),
    train.weight_decay 0;
  * scaled: r 4, alpha 16 (s = 4), lr 2e-3: where s goes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_adapter_case import base_linears, train_layers  # noqa: E402
from tests.parity_case import write_fixture  # noqa: E402

COMMIT = "7ea8c0e7c2ac64afe84a7db52d41e69bed5d5764"
SRC = Path(os.environ.get("SOMA_SRC", "/tmp/parity/soma/src"))
SHAPES = [(24, 20), (20, 24)]


def cases() -> dict:
    p = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "soma.yaml"), resolve=True)
    adam = {"betas": [0.9, 0.999], "eps": 1e-8, "steps": 12}
    return {
        "reference_config": {"rank": 16, "alpha": 16.0, "lr": 5e-5, "weight_decay": 0.05, **adam},
        "preset": {
            "rank": p["rank"],
            "alpha": float(p["alpha"]),
            "lr": 5e-4,
            "weight_decay": 0.0,
            "betas": [p["beta1"], p["beta2"]],
            "eps": p["eps"],
            "steps": 12,
        },
        "scaled": {"rank": 4, "alpha": 16.0, "lr": 2e-3, "weight_decay": 0.0, **adam},
    }


def sora_module():
    path = SRC / "rein" / "peft" / "sora.py"
    if not path.is_file():
        sys.exit(f"the reference is absent: extract ysj9909/SoMA@{COMMIT[:12]} rein/ into {SRC} (see the docstring)")
    spec = importlib.util.spec_from_file_location("soma_reference_sora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minor(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, -r:] @ torch.diag(s[-r:]) @ vh[-r:]


def factors(layer) -> dict:
    return {"B": layer.lora_B.weight, "A": layer.lora_A.weight}


def run_reference(sora, case: dict) -> dict:
    layers = []
    for old in base_linears(SHAPES):
        new = sora.Linear(
            old.in_features, old.out_features, bias=True, r=case["rank"], lora_alpha=case["alpha"], lora_dropout=0.0
        )
        new.weight = old.weight  # SoraModel._replace_module
        new.bias = old.bias
        new.sora_init("sora")
        new.bias.requires_grad_(False)  # ours keeps biases frozen (see the docstring)
        layers.append(new)
    assert all(not m.weight.requires_grad for m in layers)
    result = train_layers(layers, factors, lambda m: [p for p in m.parameters() if p.requires_grad], case, SHAPES)
    w0 = [m.weight.detach().double() for m in base_linears(SHAPES)]
    residual = [m.weight.detach().double() for m in layers]
    # the residual the authors fold into the weight: W0 - s B0 A0 = W0 minus its r smallest components
    result["residual_gap"] = max((w - res - minor(w, case["rank"])).abs().max().item() for w, res in zip(w0, residual))
    del result["init"]  # from the SVD of W0: init_checksum pins it (the fixture stays small)
    return result


def main() -> None:
    sora = sora_module()
    out = {}
    for name, case in cases().items():
        out[name] = {"settings": case, **run_reference(sora, case)}
        print(f"{name}: residual = W0 - minor components to {out[name]['residual_gap']:.1e}")
    path = write_fixture(
        "soma",
        {
            "reference": f"ysj9909/SoMA@{COMMIT[:12]} rein/peft/sora.py (Linear, sora_init('sora'))",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/soma.py",
            "shapes": SHAPES,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
