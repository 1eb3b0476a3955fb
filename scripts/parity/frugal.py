"""`.venv/bin/python scripts/parity/frugal.py`

Pins the FRUGAL authors' code (fzmushko/FRUGAL@c7ebe4c242f7 ``frugal/adamw.py`` GaloreAdamW with
``frugal/proj_optimizer_templates.py``; the repository of arXiv:2411.07837's supplementary code,
commits by F. Zmushko) on the shared parity problem (tests/parity_case.py) and writes
tests/fixtures/parity/frugal.json. Obtain the reference with the ``fetch`` tool
(github:fzmushko/FRUGAL), then

    git --git-dir=<that git dir> archive c7ebe4c242f7908e036c287e3a10512a84634648 | tar -x -C /tmp/parity/frugal/src

(another folder: PARITY_FRUGAL_SRC=...). It imports transformers (in the project venv) and torch's
old private ``torch.optim.optimizer._dispatch_sqrt`` (gone from recent torch: this script supplies
the square root of a float under that name). GaloreAdamW (the SVD projector, lorabench's default
``projector: svd``) runs 12 steps of the seeded gradients in four cases: the class's own defaults
(lr 1e-3, eps 1e-8, weight decay 0.01, density 0.25, gap 200, signSGD at inactive_lr_scale 1.0,
moments reset), our preset (conf/method/frugal.yaml), the preset with a refresh every 3 steps, a
large lr, weight decay and proj_params_lr_scale 0.5, and SGD on the residual without the moment
reset at eps 1e-4 (where the eps placement shows far above the tolerance). The param groups are
the ones lorabench builds: biases without decay, the four weights projected.
tests/test_parity_galore_family.py runs lorabench's ``frugal`` on the same cases.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SRC = Path(os.environ.get("PARITY_FRUGAL_SRC", "/tmp/parity/frugal/src"))
COMMIT = "c7ebe4c242f7908e036c287e3a10512a84634648"
STEPS = 12

from tests.parity_case import (  # noqa: E402
    feed_gradients,
    other_params,
    parity_model,
    projected_weights,
    snapshot,
    write_fixture,
)

METHOD_KEYS = (
    "density",
    "update_gap",
    "projector",
    "inactive_update_rule",
    "inactive_lr_scale",
    "proj_params_lr_scale",
    "reset_statistics",
    "proj_type",
    "beta1",
    "beta2",
    "eps",
)


def reference():
    if not (SRC / "frugal" / "proj_optimizer_templates.py").is_file():
        sys.exit(
            f"the FRUGAL code is not under {SRC}; fetch github:fzmushko/FRUGAL and run\n"
            f"  git --git-dir=<git dir> archive {COMMIT} | tar -x -C {SRC}"
        )
    import torch.optim.optimizer as torch_optimizer

    if not hasattr(torch_optimizer, "_dispatch_sqrt"):
        torch_optimizer._dispatch_sqrt = math.sqrt  # only ever called on a float bias correction
    sys.path.insert(0, str(SRC))
    import frugal

    assert Path(frugal.__file__).resolve().is_relative_to(SRC.resolve()), frugal.__file__
    return frugal


def preset(name: str, keys) -> dict:
    conf = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    return {k: conf[k] for k in keys}


def cases() -> dict[str, dict]:
    ours = preset("frugal", METHOD_KEYS)
    defaults = {
        **ours,
        "density": 0.25,
        "update_gap": 200,
        "projector": "svd",
        "inactive_update_rule": "sign_sgd",
        "inactive_lr_scale": 1.0,
        "proj_params_lr_scale": 1.0,
        "reset_statistics": True,
        "proj_type": "std",
        "eps": 1e-8,
    }
    short = {**ours, "update_gap": 3}
    return {
        "reference_defaults": {"lr": 1e-3, "weight_decay": 0.01, "steps": STEPS, "method": defaults},
        "preset": {"lr": 1e-3, "weight_decay": 0.0, "steps": STEPS, "method": ours},
        "refresh_decay": {
            "lr": 1e-2,
            "weight_decay": 0.1,
            "steps": STEPS,
            "method": {**short, "proj_params_lr_scale": 0.5},
        },
        "sgd_no_reset_eps": {
            "lr": 1e-2,
            "weight_decay": 0.1,
            "steps": STEPS,
            "method": {**short, "inactive_update_rule": "sgd", "reset_statistics": False, "eps": 1e-4},
        },
    }


def run(frugal, settings: dict) -> dict:
    model = parity_model()
    method = settings["method"]
    assert method["projector"] == "svd", "GaloreAdamW is FRUGAL's SVD projector"
    proj = projected_weights(model)
    groups = [
        {"params": other_params(model), "weight_decay": 0.0, "is_proj_params": False},
        {"params": proj, "weight_decay": settings["weight_decay"], "is_proj_params": True},
    ]
    rule = {"none": "no"}.get(method["inactive_update_rule"], method["inactive_update_rule"])
    opt = frugal.GaloreAdamW(
        groups,
        proj_params_lr_scale=method["proj_params_lr_scale"],
        update_gap=method["update_gap"],
        density=method["density"],
        reset_statistics=method["reset_statistics"],
        inactive_update_rule=rule,
        inactive_lr_scale=method["inactive_lr_scale"],
        proj_side=method["proj_type"],
        proj_type="svd",
        lr=settings["lr"],
        betas=(method["beta1"], method["beta2"]),
        eps=method["eps"],
        weight_decay=settings["weight_decay"],
        no_deprecation_warning=True,
    )
    trajectory = feed_gradients(model, opt, settings["steps"])
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: list(opt.state[p]["exp_avg"].shape) for p in proj}
    return {"settings": settings, "final": snapshot(model), "trajectory": trajectory, "moment_shapes": moments}


def main() -> None:
    frugal = reference()
    out = {name: run(frugal, settings) for name, settings in cases().items()}
    path = write_fixture(
        "frugal",
        {
            "reference": f"fzmushko/FRUGAL@{COMMIT[:12]} frugal/adamw.py (GaloreAdamW)",
            "version": COMMIT,
            "produced_by": "scripts/parity/frugal.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
