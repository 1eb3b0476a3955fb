"""Pin DCT-AdamW's trajectory from the authors' code: writes tests/fixtures/parity/dct_adamw.json.

    .venv/bin/python scripts/parity/dct_adamw.py

Reference: IST-DASLab/ISTA-DASLab-Optimizers at commit 4c98e6e7d8a51147cc8fdd77458baac881852b56
(package version 1.1.15; ``ista_daslab_optimizers/fft_low_rank/dct_adamw.py``, ``fft_projector.py``
and ``utils/dct.py``, unchanged since 4273852f). Obtain it with the repository fetched as a bare git
directory GIT_DIR:

    mkdir -p /tmp/parity/dct_adamw/src
    git --git-dir=GIT_DIR archive 4c98e6e7d8a51147cc8fdd77458baac881852b56 | tar -x -C /tmp/parity/dct_adamw/src

(or point DCT_ADAMW_SRC at another extracted tree). Only the pure-torch ``DCTAdamW`` runs here, on
CPU: the package ``__init__`` (which loads the CUDA kernels of the other optimizers) is bypassed by
registering an empty package whose path is the source folder.

The problem is tests/parity_case.py's MLP with seeded gradients. The reference builds one DCT matrix,
from the first low-rank weight's smaller dimension, so it runs one optimizer per distinct projected
dimension (16: the 24x16 and 16x24 weights and the biases; 24: the square weight; 10: the 10x16
weight); every instance counts the same steps, so this is the reference's update for every tensor.
Weights decay, biases do not (lorabench's groups). Cases: the reference's defaults (gap 1), the
preset (conf/method/dct_adamw.yaml), gap 5 (the refresh schedule between refreshes) and eps 1e-3
(where adding eps to sqrt(v) before or after the bias correction differs by more than the tolerance).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import types
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import (  # noqa: E402
    WEIGHTS,
    feed_gradients,
    other_params,
    parity_model,
    snapshot,
    write_fixture,
)

COMMIT = "4c98e6e7d8a51147cc8fdd77458baac881852b56"
SRC = Path(os.environ.get("DCT_ADAMW_SRC", "/tmp/parity/dct_adamw/src"))
STEPS = 12
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "dct_adamw.yaml"))


def reference_class():
    package = SRC / "ista_daslab_optimizers"
    if not (package / "fft_low_rank" / "dct_adamw.py").is_file():
        sys.exit(
            f"the reference is absent: extract IST-DASLab/ISTA-DASLab-Optimizers@{COMMIT} into {SRC}"
            " (see the docstring of scripts/parity/dct_adamw.py)"
        )
    stub = types.ModuleType("ista_daslab_optimizers")
    stub.__path__ = [str(package)]
    sys.modules["ista_daslab_optimizers"] = stub
    from ista_daslab_optimizers.fft_low_rank.dct_adamw import DCTAdamW

    return DCTAdamW


class PerDimension:
    """The reference optimizers, one per projected dimension, stepped together."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def step(self):
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints every state it allocates
            for opt in self.optimizers:
                opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def run_case(cls, settings: dict) -> dict:
    model = parity_model()
    weights = {name: model[int(name)].weight for name in WEIGHTS}
    by_dim: dict[int, list] = {}
    for name in WEIGHTS:
        by_dim.setdefault(min(weights[name].shape), []).append(weights[name])
    kw = {
        "lr": settings["lr"],
        "weight_decay": settings["weight_decay"],
        "rank": settings["rank"],
        "proj": "dct",
        "update_proj_gap": settings["update_proj_gap"],
        "max_shape": settings["max_shape"],
        "betas": (settings["beta1"], settings["beta2"]),
        "eps": settings["eps"],
    }
    optimizers = []
    for d, params in by_dim.items():
        groups = [{"params": params, "weight_decay": settings["weight_decay"]}]
        if d == 16:
            groups.append({"params": other_params(model), "weight_decay": 0.0})
        optimizers.append(cls(groups, **kw))
    opt = PerDimension(optimizers)
    names = {id(p): f"{name}.weight" for name, p in weights.items()}
    states = {}

    def record_indices(t):
        for sub in optimizers:
            for p, state in sub.state.items():
                if "fft-low-rank-projector" in state:
                    projector = state["fft-low-rank-projector"]
                    states.setdefault(names[id(p)], []).append(projector.indices_crt.tolist())

    trajectory = feed_gradients(model, opt, STEPS, after_step=record_indices)
    shapes = {}
    for sub in optimizers:
        for p, state in sub.state.items():
            if id(p) in names:
                shapes[names[id(p)]] = {
                    "exp_avg": list(state["m"].shape),
                    "exp_avg_sq": list(state["v"].shape),
                    "side": "right" if state["fft-low-rank-projector"].is_right_proj else "left",
                }
    dct_sizes = sorted(sub.Q.shape[0] for sub in optimizers)
    return {
        "settings": settings,
        "steps": STEPS,
        "final": snapshot(model),
        "trajectory": trajectory,
        "indices_per_step": states,
        "state_shapes": shapes,
        "dct_sizes": dct_sizes,
    }


def main() -> None:
    cls = reference_class()
    preset = {k: PRESET[k] for k in ("rank", "update_proj_gap", "max_shape", "beta1", "beta2", "eps")}
    defaults = {"rank": 4, "update_proj_gap": 1, "max_shape": 32_000, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    cases = {
        "reference_defaults": {**defaults, "lr": 1e-2, "weight_decay": 0.1},
        "preset": {**preset, "lr": 1e-3, "weight_decay": 0.01},
        "gap_5": {**defaults, "update_proj_gap": 5, "lr": 1e-2, "weight_decay": 0.1},
        "eps_1e-3": {**defaults, "eps": 1e-3, "lr": 1e-2, "weight_decay": 0.1},
    }
    payload = {
        "reference": "IST-DASLab/ISTA-DASLab-Optimizers ista_daslab_optimizers/fft_low_rank/dct_adamw.py (DCTAdamW)",
        "version": f"{COMMIT} (package 1.1.15)",
        "produced_by": "scripts/parity/dct_adamw.py",
        "case": "tests/parity_case.py MLP, seeded gradients (seed 1); one reference optimizer per DCT size",
        "cases": {name: run_case(cls, settings) for name, settings in cases.items()},
    }
    print(write_fixture("dct_adamw", payload).relative_to(ROOT))


if __name__ == "__main__":
    main()
