"""Pin LaMDA's adapter and PMB freezing from the authors' code: writes tests/fixtures/parity/lamda.json.

    .venv/bin/python scripts/parity/lamda.py

Reference: ArminAzizi98/LaMDA at commit 8ad34b46e15496be1279afebb80206cd91163933: ``lamda.py``
(``get_lamda_model``: a ``sigma`` r x r ``nn.Linear`` inserted into peft's LoRA layers, ``lora_A``
frozen) and ``custom_trainer.py`` (``gradual_freeze_B``, called by their trainer after every backward
with eta = 0.3). Obtain it with the repository fetched as a bare git directory GIT_DIR:

    mkdir -p /tmp/parity/lamda/src
    git --git-dir=GIT_DIR archive 8ad34b46e15496be1279afebb80206cd91163933 lamda.py custom_trainer.py \\
        | tar -x -C /tmp/parity/lamda/src

(or point LAMDA_SRC at another extracted tree). ``lamda.py`` is imported as is, on the installed peft
(the version is recorded); ``gradual_freeze_B`` is a method of their copy of transformers' Trainer,
which cannot be imported on its own, so the method alone is read from ``custom_trainer.py`` and run
(its ``self`` is unused). Their training loop is replaced by its minimal part
(tests/test_parity_lamda_increlora.py ``lamda_drive``: the Trainer's AdamW groups, clipping at 1.0,
a transformers schedule, ``gradual_freeze_B`` with their cumulative micro-batch counter after each
backward, ``zero_grad(set_to_none=True)``). Two interventions, both on values only: ``sigma`` is cast
back to float32 (their scripts load models in bfloat16; with a float32 model their forward fails on
the dtype mismatch), and the initial PMA and sigma are overwritten by the case's seeded bank (drawn
by the same Kaiming-uniform rule; the statistics of the reference's own init are recorded under
``init``). Cases (12 steps each, so t = floor(g / (0.3 T)) reaches 1, 2 and 3):
  * reference_defaults: the authors' defaults (rank 64, lora_alpha 16, lora_dropout 0.1, weight decay
    0.1, lr 3e-4, cosine schedule with 3% warm-up) on a 64 -> 80 -> 64 -> 8 MLP;
  * preset: conf/method/lamda.yaml (rank 8, alpha 16, dropout 0.1, eta 0.3) with lr 1e-2, no weight
    decay, linear schedule with 6% warm-up (lorabench's defaults) on the 16 -> 24 -> 24 -> 16 -> 10 MLP;
  * mixed_ranks: per-layer ranks 2, 8, 3 (peft ``rank_pattern``; LaMDA++'s ranks take this path), weight
    decay 0.1: the rank-2 and rank-3 PMBs stop training.
"""

from __future__ import annotations

import ast
import math
import os
import sys
import textwrap
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.test_parity_lamda_increlora import lamda_bank, lamda_drive, mlp, schedule, targets_of  # noqa: E402

COMMIT = "8ad34b46e15496be1279afebb80206cd91163933"
SRC = Path(os.environ.get("LAMDA_SRC", "/tmp/parity/lamda/src"))
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "lamda.yaml"))


def load_reference():
    if not (SRC / "lamda.py").is_file() or not (SRC / "custom_trainer.py").is_file():
        sys.exit(f"the LaMDA reference is not at {SRC}: extract {COMMIT[:12]} there (see this script's docstring)")
    sys.path.insert(0, str(SRC))
    import lamda  # the authors' module

    tree = ast.parse((SRC / "custom_trainer.py").read_text())
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "gradual_freeze_B"]
    source = textwrap.dedent(ast.get_source_segment((SRC / "custom_trainer.py").read_text(), node))
    scope: dict = {}
    exec(compile(source, "custom_trainer.py:gradual_freeze_B", "exec"), scope)
    return lamda, scope["gradual_freeze_B"]


def reference_model(case: dict, lamda):
    import peft

    widths, targets = case["widths"], targets_of(case["widths"])
    ranks = case["ranks"]
    r = max(ranks.values())
    config = peft.LoraConfig(
        r=r,
        lora_alpha=case["alpha"],
        lora_dropout=case["dropout"],
        target_modules=targets,
        init_lora_weights=True,
        rank_pattern={n: k for n, k in ranks.items() if k != r},
    )
    model = peft.get_peft_model(mlp(widths, case["model_seed"]), config)
    lamda.get_lamda_model(model)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "sigma")}
    return model, layers


def init_statistics(lamda) -> dict:
    """The reference's own init on a 64 -> 80 layer with rank 16."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(64, 80)),
        peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=["0"], init_lora_weights=True),
    )
    lamda.get_lamda_model(model)
    layer = model.base_model.model[0]
    a, s, b = (layer.lora_A["default"].weight, layer.sigma["default"].weight, layer.lora_B["default"].weight)
    return {
        "B_absmax": b.abs().max().item(),
        "A_scaled_absmax": (a.abs().max() * math.sqrt(64)).item(),
        "A_scaled_absmean": (a.abs().mean() * math.sqrt(64)).item(),
        "S_scaled_absmax": (s.float().abs().max() * math.sqrt(16)).item(),
        "S_scaled_absmean": (s.float().abs().mean() * math.sqrt(16)).item(),
        "S_dtype": str(s.dtype),
        "scaling": layer.scaling["default"],
        "trainable": sorted({n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}),
    }


def run_case(case: dict, lamda, gradual_freeze_b) -> dict:
    model, layers = reference_model(case, lamda)
    with torch.no_grad():
        for name, init in lamda_bank(case).items():
            layer = layers[name]
            layer.sigma["default"].float()
            layer.lora_A["default"].weight.copy_(init["A"])
            layer.sigma["default"].weight.copy_(init["S"])
            assert layer.lora_B["default"].weight.abs().max() == 0
    # the HF Trainer's groups: weight decay on everything but biases and LayerNorm weights
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if "bias" not in n], "weight_decay": case["weight_decay"]},
            {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0},
        ],
        lr=case["lr"],
    )

    def after_backward(step: int) -> None:  # their trainer: total_iter counts micro-batches from 1
        gradual_freeze_b(None, model, step + 1, case["steps"], 1, eta=case["eta"])

    def tensors():
        return {n: {"B": m.lora_B["default"].weight, "S": m.sigma["default"].weight} for n, m in layers.items()}

    return lamda_drive(model, optimizer, schedule(optimizer, case), case, tensors, after_backward)


def cases() -> dict[str, dict]:
    common = {"steps": 12, "eta": 0.3, "model_seed": 0, "bank_seed": 1, "data_seed": 2, "dropout_seed": 1000}
    small = [16, 24, 24, 16, 10]
    return {
        "reference_defaults": {
            **common,
            "widths": [64, 80, 64, 8],
            "ranks": {"0": 64, "2": 64},
            "alpha": 16,
            "dropout": 0.1,
            "lr": 3e-4,
            "weight_decay": 0.1,
            "schedule": "cosine",
            "warmup": math.ceil(0.03 * 12),
            "final": "sample",
        },
        "preset": {
            **common,
            "widths": small,
            "ranks": dict.fromkeys(targets_of(small), PRESET["rank"]),
            "alpha": PRESET["alpha"],
            "dropout": PRESET["dropout"],
            "eta": PRESET["pmb_freeze_every"],
            "lr": 1e-2,
            "weight_decay": 0.0,
            "schedule": "linear",
            "warmup": math.ceil(0.06 * 12),
            "final": "full",
        },
        "mixed_ranks": {
            **common,
            "widths": small,
            "ranks": {"0": 2, "2": 8, "4": 3},
            "alpha": 16,
            "dropout": 0.1,
            "lr": 1e-2,
            "weight_decay": 0.1,
            "schedule": "linear",
            "warmup": 1,
            "final": "full",
        },
    }


def main() -> None:
    import peft

    lamda, gradual_freeze_b = load_reference()
    out = {}
    for name, case in cases().items():
        record = run_case(case, lamda, gradual_freeze_b)
        out[name] = {"settings": case, "record": record}
        print(f"{name}: zero columns per step {[max(z.values(), default=0) for z in record['zero_cols']]}")
    path = write_fixture(
        "lamda",
        {
            "reference": f"ArminAzizi98/LaMDA@{COMMIT[:12]} lamda.py + custom_trainer.py gradual_freeze_B",
            "version": COMMIT,
            "peft": peft.__version__,
            "produced_by": "scripts/parity/lamda.py",
            "init": init_statistics(lamda),
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
