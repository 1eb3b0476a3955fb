"""`.venv/bin/python scripts/parity/fira.py`

Pins pip fira 1.0.2 (the authors' package, = xichen-fy/Fira ``optimizer_torch/``) on the shared
parity problem (tests/parity_case.py) and writes tests/fixtures/parity/fira.json. The reference is
installed outside the project venv:

    .venv/bin/pip install --no-deps --target /tmp/parity/fira/site fira==1.0.2

(another folder: PARITY_FIRA_SITE=...). FiraAdamW runs 12 steps of the seeded gradients in three
cases: fira's own defaults (FiraAdamW's lr 1e-3, eps 1e-6, no decay; ``divide_params``' alpha 1.0,
gap 200, proj_type std, the README's rank 8), our preset (conf/method/fira.yaml; alpha = our
scale 0.25, where the residual form matters), and the preset with a short refresh gap, a large lr
and weight decay. The param groups are the ones lorabench builds: biases without decay, the four
weights projected. tests/test_parity_galore_family.py runs lorabench's ``fira`` on the same cases.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SITE = Path(os.environ.get("PARITY_FIRA_SITE", "/tmp/parity/fira/site"))
VERSION = "1.0.2"
STEPS = 12

from tests.parity_case import (  # noqa: E402
    feed_gradients,
    other_params,
    parity_model,
    projected_weights,
    snapshot,
    write_fixture,
)

METHOD_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "gamma", "fira_residual", "beta1", "beta2", "eps")


def reference():
    if not (SITE / "fira").is_dir():
        sys.exit(
            f"fira {VERSION} not found under {SITE}; install it with\n"
            f"  .venv/bin/pip install --no-deps --target {SITE} fira=={VERSION}"
        )
    sys.path.insert(0, str(SITE))
    import fira

    assert Path(fira.__file__).resolve().is_relative_to(SITE.resolve()), fira.__file__
    return fira


def preset(name: str, keys) -> dict:
    conf = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    return {k: conf[k] for k in keys}


def cases() -> dict[str, dict]:
    ours = preset("fira", METHOD_KEYS)
    defaults = {**ours, "rank": 8, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "eps": 1e-6}
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


def run(fira, settings: dict) -> dict:
    model = parity_model()
    method = settings["method"]
    assert method["gamma"] == 1.01 and method["fira_residual"] == "package", "fira fixes both"
    proj = projected_weights(model)
    groups = [
        {"params": other_params(model), "weight_decay": 0.0},
        {
            "params": proj,
            "weight_decay": settings["weight_decay"],
            "rank": method["rank"],
            "update_proj_gap": method["update_proj_gap"],
            "alpha": method["scale"],
            "proj_type": method["proj_type"],
        },
    ]
    opt = fira.FiraAdamW(
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
    fira = reference()
    out = {name: run(fira, settings) for name, settings in cases().items()}
    path = write_fixture(
        "fira",
        {
            "reference": f"pip fira=={VERSION} (FiraAdamW; = xichen-fy/Fira optimizer_torch/)",
            "version": VERSION,
            "produced_by": "scripts/parity/fira.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
