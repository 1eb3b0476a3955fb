"""Pin DyLoRA's layer and rank sampling from the authors' code: writes tests/fixtures/parity/dylora.json.

    .venv/bin/python scripts/parity/dylora.py

Reference: huawei-noah/Efficient-NLP at commit bb44348bc897779be9357cef8dfd8e397d17ed49, folder DyLoRA/
(``loralib/layers.py``: the LoRA ``Linear`` with its ``nd_lora_A`` / ``nd_lora_B`` truncations;
``loralib/DyLoRA.py``: ``dynamic``, which keeps the first b ranks, scales each factor by
sqrt(r_max / b) and in frozen mode detaches ranks < b; ``examples/NLU/examples/text-classification/
run_glue.py``: the Trainer callback that draws b - 1 = torch.randint(0, r_max) before every step and
sets it with ``frozen=True``). Obtain it with the ``fetch`` tool (or git) and extract the folder:

    git --git-dir=<mirror> archive bb44348bc897779be9357cef8dfd8e397d17ed49 DyLoRA | tar -x -C /tmp/parity/dylora/src

(or point DYLORA_SRC at another folder holding ``DyLoRA/loralib``). Only ``layers.py`` and
``DyLoRA.py`` are imported (the package ``__init__`` also wants microsoft/LoRA's ``utils.py``, which
holds no numerics).

The case (tests/parity_one_linear.py): one pretrained 10 -> 8 linear layer with bias, seeded inputs
and upstream gradients, 12 steps of torch.optim.AdamW (the GLUE scripts' HF Trainer puts lora_A and
lora_B in its decayed group). The reference layer is built right after torch.manual_seed(seed), its
Kaiming-uniform lora_A (torch's global generator) recorded as the init that ours loads, and the
callback's draws come from that same global generator (recorded as ``ranks``). After training, the
outputs at every rank 1..r_max in eval mode (the script's per-rank evaluation) are pinned too. Cases:
  * reference_defaults: the authors' roberta_base_sst2.sh (r 8, alpha 16, frozen, lr 5e-4, wd 0.1);
  * preset: conf/method/dylora.yaml as it stands, lr 5e-4 (the leaderboard's), train.weight_decay 0;
  * unfrozen: ``set_rank(b - 1, frozen=False)`` (all ranks <= b train), lr 1e-2.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_one_linear import OneLinear, plain, run  # noqa: E402

COMMIT = "bb44348bc897779be9357cef8dfd8e397d17ed49"
SRC = Path(os.environ.get("DYLORA_SRC", "/tmp/parity/dylora/src"))
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "dylora.yaml"))
SHAPE = dict(d_in=10, d_out=8, batch=3, weight_seed=0, data_seed=1, steps=12, seed=3)


def loralib():
    folder = SRC / "DyLoRA" / "loralib"
    if not (folder / "layers.py").is_file():
        sys.exit(f"the reference is absent: extract huawei-noah/Efficient-NLP@{COMMIT[:12]} DyLoRA/ into {SRC}")
    package = types.ModuleType("loralib")
    package.__path__ = [str(folder)]  # the modules without the package __init__ (see the docstring)
    sys.modules["loralib"] = package
    return importlib.import_module("loralib.layers")


def cases() -> dict:
    preset = {k: PRESET[k] for k in ("rank", "alpha", "frozen")}
    return {
        "reference_defaults": {
            **SHAPE,
            "rank": 8,
            "alpha": 16.0,
            "frozen": True,
            "lr": 5e-4,
            "weight_decay": 0.1,
            "ours": {"rank": 8, "alpha": 16.0, "frozen": True},
        },
        "preset": {**SHAPE, **preset, "lr": 5e-4, "weight_decay": 0.0, "ours": {}},
        "unfrozen": {
            **SHAPE,
            "rank": 8,
            "alpha": 16.0,
            "frozen": False,
            "lr": 1e-2,
            "weight_decay": 0.0,
            "ours": {"rank": 8, "alpha": 16.0, "frozen": False},
        },
    }


def run_reference(layers, case: dict) -> dict:
    base = OneLinear(case["d_in"], case["d_out"], case["weight_seed"])
    torch.manual_seed(case["seed"])
    lin = layers.Linear(case["d_in"], case["d_out"], r=case["rank"], lora_alpha=case["alpha"])
    with torch.no_grad():
        lin.weight.copy_(base.lin.weight)
        lin.bias.copy_(base.lin.bias)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    init = {"lora_A": plain(lin.lora_A), "lora_B": plain(lin.lora_B)}
    tensors = {"lora_A": lin.lora_A, "lora_B": lin.lora_B}
    optimizer = torch.optim.AdamW(
        list(tensors.values()),
        lr=case["lr"],
        betas=(PRESET["beta1"], PRESET["beta2"]),
        eps=PRESET["eps"],
        weight_decay=case["weight_decay"],
    )
    ranks = []

    def draw(t: int) -> None:  # the script's on_step_begin callback
        k = torch.randint(0, lin.get_dimension(), (1,)).item()
        lin.set_rank(k, frozen=case["frozen"])
        ranks.append(k + 1)

    lin.train()
    out = run(lin, tensors, optimizer, case, before_forward=draw)
    lin.train(False)  # what model.eval() calls (the layer's own eval() would merge at the last drawn rank)
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(99))
    per_rank = {}
    with torch.no_grad():
        for k in range(case["rank"]):  # the script's per-rank evaluation
            lin.set_rank(k)
            per_rank[str(k + 1)] = plain(lin(x))
    return {"init": init, "ranks": ranks, **out, "eval_input_seed": 99, "eval_by_rank": per_rank}


def main() -> None:
    layers = loralib()
    out = {}
    for name, case in cases().items():
        out[name] = {**case, **run_reference(layers, case)}
        print(f"{name}: ranks {out[name]['ranks']}")
    path = write_fixture(
        "dylora",
        {
            "reference": f"huawei-noah/Efficient-NLP@{COMMIT[:12]} DyLoRA/loralib"
            " (layers.py Linear, DyLoRA.py dynamic)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/dylora.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
