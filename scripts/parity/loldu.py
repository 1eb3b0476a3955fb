"""Pin LoLDU's layer from the authors' code: writes tests/fixtures/parity/loldu.json.

    .venv/bin/python scripts/parity/loldu.py

Reference: SKDDJ/LoLDU at commit 4fe87a05a668006f55153539cece7fffa91ed91d, ``minloldu/loldu.py``
(``LoLDUParametrization``: the pivoted LDU of W0 on first use, the weight replaced by W0 - sigma P L_r
diag(D_r) U_r, the parametrized weight that plus sigma P L_r diag(z) U_r, sigma = lora_alpha / rank with
``from_linear``'s lora_alpha = 1; ``add_loldu``) and ``minloldu/loldu_utils.py`` (``get_loldu_params``:
vector_z only), used as its README shows (freeze every parameter, train ``get_loldu_params``). Obtain it
with the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive 4fe87a05a668006f55153539cece7fffa91ed91d | tar -x -C /tmp/parity/loldu/src

(or point LOLDU_SRC elsewhere). Its module subclasses ``lightning.LightningModule`` only as a base
class; the script provides ``nn.Module`` under that name (lightning is not installed here).

The case (tests/parity_one_linear.py): one pretrained 10 -> 8 linear layer with bias, seeded inputs and
upstream gradients, 12 steps of torch.optim.AdamW. Cases:
  * reference_defaults: its default configuration's rank (768: every pivot of a base model's weights)
    -> every pivot here (8), lr 5e-2;
  * preset: conf/method/loldu.yaml as it stands, lr 2e-2 (the leaderboard's);
  * rank4: an explicit rank 4 (its README passes rank to ``from_linear``), lr 5e-2.
"""

from __future__ import annotations

import os
import sys
import types
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_one_linear import OneLinear, plain, run  # noqa: E402

COMMIT = "4fe87a05a668006f55153539cece7fffa91ed91d"
SRC = Path(os.environ.get("LOLDU_SRC", "/tmp/parity/loldu/src"))
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "loldu.yaml"))
SHAPE = dict(d_in=10, d_out=8, batch=3, weight_seed=0, data_seed=1, steps=12, weight_decay=0.0)


def minloldu():
    if not (SRC / "minloldu" / "loldu.py").is_file():
        sys.exit(f"the reference is absent: extract SKDDJ/LoLDU@{COMMIT[:12]} into {SRC}")
    sys.modules.setdefault("lightning", types.SimpleNamespace(LightningModule=nn.Module))
    sys.path.insert(0, str(SRC))
    import minloldu as package

    return package


def cases() -> dict:
    full = min(SHAPE["d_in"], SHAPE["d_out"])
    preset_rank = PRESET["rank"] or full
    assert PRESET["alpha"] == 1.0 and not PRESET["train_scalar"], "the reference trains vector_z under 1 / rank"
    return {
        "reference_defaults": {**SHAPE, "rank": full, "lr": 5e-2, "ours": {"rank": 0}},
        "preset": {**SHAPE, "rank": preset_rank, "lr": 2e-2, "ours": {}},
        "rank4": {**SHAPE, "rank": 4, "lr": 5e-2, "ours": {"rank": 4}},
    }


def run_reference(package, case: dict) -> dict:
    model = OneLinear(case["d_in"], case["d_out"], case["weight_seed"])
    config = {nn.Linear: {"weight": partial(package.LoLDUParametrization.from_linear, rank=case["rank"])}}
    package.add_loldu(model, loldu_config=config)
    for p in model.parameters():  # its README: freeze everything, then train get_loldu_params
        p.requires_grad = False
    params = list(package.get_loldu_params(model))
    for p in params:
        p.requires_grad = True
    (z,) = params
    layer = model.lin.parametrizations.weight[0]
    assert layer.scaling_factor.item() == 1.0 / case["rank"]
    init = {"diag": plain(z)}
    optimizer = torch.optim.AdamW(params, lr=case["lr"], weight_decay=case["weight_decay"])
    out = run(model, {"diag": z}, optimizer, case)
    return {"init": init, "sigma": layer.scaling_factor.item(), **out}


def main() -> None:
    package = minloldu()
    out = {}
    for name, case in cases().items():
        out[name] = {**case, **run_reference(package, case)}
        print(f"{name}: rank {case['rank']}, sigma {out[name]['sigma']:.4g}")
    path = write_fixture(
        "loldu",
        {
            "reference": f"SKDDJ/LoLDU@{COMMIT[:12]} (minloldu/loldu.py LoLDUParametrization, loldu_utils.py)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/loldu.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
