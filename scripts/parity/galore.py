"""`.venv/bin/python scripts/parity/galore.py`

Pins galore-torch 1.0 (pip; the authors' package, = jiaweizzhao/GaLore) on the shared parity problem
(tests/parity_case.py) and writes tests/fixtures/parity/galore.json. The reference is installed
outside the project venv:

    .venv/bin/pip install --no-deps --target /tmp/parity/galore/site galore-torch==1.0

(another folder: PARITY_GALORE_SITE=...). GaLoreAdamW runs 12 steps of the seeded gradients in
three cases: galore-torch's own defaults (GaLoreAdamW's lr 1e-3, eps 1e-6, no decay; the
projector's scale 1.0, gap 200, proj_type std; rank 8, since the README's 128 exceeds every
dimension of the parity model), our preset (conf/method/galore.yaml), and the preset with a short
refresh gap, a large lr and weight decay (subspace refreshes and decay placement become visible).
The param groups are the ones lorabench builds: biases without decay, the four weights projected.
tests/test_parity_galore_family.py runs lorabench's ``galore`` (and ``galore_torch``) on the same
cases and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SITE = Path(os.environ.get("PARITY_GALORE_SITE", "/tmp/parity/galore/site"))
VERSION = "1.0"
STEPS = 12

from tests.parity_case import (  # noqa: E402
    feed_gradients,
    other_params,
    parity_model,
    projected_weights,
    snapshot,
    write_fixture,
)


def reference():
    if not (SITE / "galore_torch").is_dir():
        sys.exit(
            f"galore-torch {VERSION} not found under {SITE}; install it with\n"
            f"  .venv/bin/pip install --no-deps --target {SITE} galore-torch=={VERSION}"
        )
    sys.path.insert(0, str(SITE))
    import galore_torch

    assert Path(galore_torch.__file__).resolve().is_relative_to(SITE.resolve()), galore_torch.__file__
    return galore_torch


def preset(name: str, keys) -> dict:
    conf = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    return {k: conf[k] for k in keys}


METHOD_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projector", "beta1", "beta2", "eps")


def cases() -> dict[str, dict]:
    ours = preset("galore", METHOD_KEYS)
    defaults = {**ours, "scale": 1.0, "eps": 1e-6, "beta1": 0.9, "beta2": 0.999}
    return {
        "reference_defaults": {"lr": 1e-3, "weight_decay": 0.0, "steps": STEPS, "method": defaults},
        "preset": {"lr": 1e-3, "weight_decay": 0.0, "steps": STEPS, "method": ours},
        "refresh_decay": {
            "lr": 1e-2,
            "weight_decay": 0.1,
            "steps": STEPS,
            "method": {**ours, "update_proj_gap": 3},
        },
    }


def run(galore_torch, settings: dict) -> dict:
    model = parity_model()
    method = settings["method"]
    assert method["projector"] == "svd", "galore-torch projects by SVD only"
    proj = projected_weights(model)
    groups = [
        {"params": other_params(model), "weight_decay": 0.0},
        {
            "params": proj,
            "weight_decay": settings["weight_decay"],
            "rank": method["rank"],
            "update_proj_gap": method["update_proj_gap"],
            "scale": method["scale"],
            "proj_type": method["proj_type"],
        },
    ]
    opt = galore_torch.GaLoreAdamW(
        groups,
        lr=settings["lr"],
        betas=(method["beta1"], method["beta2"]),
        eps=method["eps"],
        no_deprecation_warning=True,
    )
    trajectory = feed_gradients(model, opt, settings["steps"])
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: list(opt.state[p]["exp_avg"].shape) for p in proj}
    return {"settings": settings, "final": snapshot(model), "trajectory": trajectory, "moment_shapes": moments}


def main() -> None:
    galore_torch = reference()
    out = {name: run(galore_torch, settings) for name, settings in cases().items()}
    path = write_fixture(
        "galore",
        {
            "reference": f"pip galore-torch=={VERSION} (GaLoreAdamW)",
            "version": VERSION,
            "produced_by": "scripts/parity/galore.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
