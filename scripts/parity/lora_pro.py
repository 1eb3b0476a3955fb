"""`.venv/bin/python scripts/parity/lora_pro.py`

Pins LoRA-Pro's released optimizer, mrflogs/LoRA-Pro@fe2602725b21 (2025-04-08, "update fix bug
lora-pro"): the authors run Adam inside their vendored DeepSpeed, in
``DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py`` (``DeepSpeedZeroOptimizer.
lorapro_full_adjustment`` and the module-level ``solve_sylvester``), and let the Trainer's plain SGD
(``optim="sgd"``, their README) apply the adjusted gradients. Obtain the file with

    fetch github:mrflogs/LoRA-Pro   (a bare git directory <dir>)
    mkdir -p /tmp/parity/lora_pro/src
    git --git-dir=<dir> archive fe2602725b21f6b1c689462d73553f3e50b3d565 \\
        DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py | tar -x -C /tmp/parity/lora_pro/src

(another folder: PARITY_LORA_PRO_SRC=...). The two functions are compiled from that file's syntax
tree as they stand (DeepSpeed itself is not imported) and driven on tests/parity_lora_case.py's four
LoRA pairs: a stand-in for the ZeRO optimizer holds ``params_in_partition``/``averaged_gradients``
(A, B alternating, as in their one-group partition), ``global_step`` and the moments; after the
adjustment ``torch.optim.SGD(lr, weight_decay)`` steps the fp32 weights, as DeepSpeed's wrapped SGD
does. Gradient clipping is off (DeepSpeed would multiply the adjusted update by its clip factor).

Two things are set per case:
* ``counting``: "released" increments ``global_step`` before each call, as their ``step()`` does (so
  the first step's bias correction uses t = 2 and the ``global_step == 0`` branches never run);
  "from_zero" calls with 0, 1, 2, ... (the counting those branches and ``step = global_step + 1``
  assume; at B = 0 the branches equal the general formula).
* ``bf16_cast``: the second moment accumulates ``g.to(torch.bfloat16)**2``, a no-op in their runs
  (DeepSpeed casts the model to bf16, so g is bf16 already) but a rounding of g in fp32/fp64. With
  ``false`` ``lorapro_full_adjustment`` sees a ``torch`` whose ``bfloat16`` attribute is the working
  dtype, nothing else changed (``solve_sylvester`` keeps the real one); ``true`` runs both verbatim.
Cases (12 steps each): their defaults (r 8, alpha 16: their hard-coded scale 16/8 = 2; lr 2e-5; no
weight decay; delta 1e-8; betas 0.9/0.999, eps 1e-8; float64); our preset (conf/method/lora_pro.yaml
with conf/train/default.yaml's lr and weight decay); a large lr with weight decay; the released
counting from a random B; the preset in float32; and the released code verbatim in float32. The
reference forms delta·I in torch's default dtype, so the delta it adds is float32(1e-8)
(``ridge_as_used``), which the test gives ours.
tests/test_parity_lora_optimizers.py runs lorabench's ``LoraProAdamW`` on the same cases.
"""

from __future__ import annotations

import ast
import os
import sys
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SRC = Path(os.environ.get("PARITY_LORA_PRO_SRC", "/tmp/parity/lora_pro/src"))
FILE = "DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py"
COMMIT = "fe2602725b21f6b1c689462d73553f3e50b3d565"
STEPS = 12
SCALE = 16 / 8  # the reference's hard-coded scaling factor (its r 8, alpha 16)

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_lora_case import lora_pairs, pair_snapshot, run_pairs  # noqa: E402


class _TorchView:
    """``torch`` with ``bfloat16`` naming another dtype (used only to neutralise the bf16 cast)."""

    def __init__(self, bf16_as: torch.dtype):
        self._bf16_as = bf16_as

    def __getattr__(self, name):
        return self._bf16_as if name == "bfloat16" else getattr(torch, name)


def reference(bf16_as: torch.dtype | None):
    """(lorapro_full_adjustment, solve_sylvester) compiled from the released file."""
    path = SRC / FILE
    if not path.is_file():
        sys.exit(
            f"LoRA-Pro's {FILE} not found under {SRC}; extract it from mrflogs/LoRA-Pro@{COMMIT[:12]} with\n"
            f"  git --git-dir=<fetched repo> archive {COMMIT} {FILE} | tar -x -C {SRC}"
        )
    tree = ast.parse(path.read_text())
    sylvester = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solve_sylvester")
    zero_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeepSpeedZeroOptimizer")
    adjust = next(n for n in zero_cls.body if isinstance(n, ast.FunctionDef) and n.name == "lorapro_full_adjustment")
    # solve_sylvester keeps the real torch: its own bf16 test would otherwise cast float64 inputs to float32
    plain = {"torch": torch}
    exec(compile(ast.Module(body=[sylvester], type_ignores=[]), str(path), "exec"), plain)
    view = torch if bf16_as is None else _TorchView(bf16_as)
    namespace = {"torch": view, "solve_sylvester": plain["solve_sylvester"]}
    exec(compile(ast.Module(body=[adjust], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["lorapro_full_adjustment"], plain["solve_sylvester"]


class _ZeroStub:
    """The attributes ``lorapro_full_adjustment`` reads on DeepSpeed's ZeRO optimizer."""

    def __init__(self, pairs):
        self.params_in_partition = {0: [t for pair in pairs for t in pair]}
        self.averaged_gradients = {}
        self.global_step = 0
        self.exp_avg, self.exp_avg_sq = {}, {}


def preset() -> dict:
    method = yaml.safe_load((ROOT / "conf" / "method" / "lora_pro.yaml").read_text())
    train = yaml.safe_load((ROOT / "conf" / "train" / "default.yaml").read_text())
    assert method["rank"] == 8 and method["alpha"] == 16.0, "the reference hard-codes scale 16 / 8"
    return {
        "lr": float(method["lr"] if method["lr"] is not None else train["lr"]),  # YAML reads 2e-4 as a string
        "weight_decay": float(train["weight_decay"]),
        "ridge": method["lora_pro_ridge"],
        "betas": [method["beta1"], method["beta2"]],
        "eps": method["eps"],
    }


def cases() -> dict[str, dict]:
    ours = preset()
    defaults = {"lr": 2e-5, "weight_decay": 0.0, "ridge": 1e-8, "betas": [0.9, 0.999], "eps": 1e-8}
    common = {"steps": STEPS, "scale": SCALE, "b_init": "zero", "counting": "from_zero", "bf16_cast": False}
    # the reference forms delta * torch.eye(r) in torch's default dtype, float32: the delta it adds
    common["ridge_as_used"] = (1e-8 * torch.eye(1))[0, 0].item()
    common["dtype"] = "float64"
    return {
        "reference_defaults": {**common, **defaults},
        "preset": {**common, **ours},
        "decay_large_lr": {**common, **ours, "lr": 1e-2, "weight_decay": 0.1},
        "released_counting": {**common, **ours, "lr": 1e-3, "b_init": "random", "counting": "released"},
        "preset_fp32": {**common, **ours, "dtype": "float32"},
        "released_verbatim_fp32": {**common, **ours, "dtype": "float32", "counting": "released", "bf16_cast": True},
    }


def run(settings: dict) -> dict:
    assert settings["ridge"] == 1e-8 and settings["betas"] == [0.9, 0.999] and settings["eps"] == 1e-8, "fixed there"
    dtype = getattr(torch, settings["dtype"])
    adjust, _ = reference(None if settings["bf16_cast"] else dtype)
    pairs = lora_pairs(dtype, settings["b_init"])
    stub = _ZeroStub(pairs)
    sgd = torch.optim.SGD([t for pair in pairs for t in pair], lr=settings["lr"], weight_decay=settings["weight_decay"])

    def step():
        stub.averaged_gradients = {0: [t.grad for pair in pairs for t in pair]}
        if settings["counting"] == "released":
            stub.global_step += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.tensor(<tensor>) in the reference
            adjust(stub, 0)
        if settings["counting"] == "from_zero":
            stub.global_step += 1
        sgd.step()  # the grads now hold the adjusted gradients (the reference rewrote their .data)

    trajectory = run_pairs(pairs, settings["scale"], step, settings["steps"])
    moments = {str(i): list(m.shape) for i, m in stub.exp_avg.items()}
    # 9 significant digits hold a float32 exactly; 13 leave float64 values (|x| < 10) within 1e-12 of
    # the computed ones, far inside the test's tolerance, and keep the fixture small
    digits = 9 if dtype == torch.float32 else 13
    final = {k: [[float(f"{x:.{digits}g}") for x in row] for row in v] for k, v in pair_snapshot(pairs).items()}
    out = {"settings": settings, "final": final, "trajectory": trajectory, "moment_shapes": moments}
    if settings["bf16_cast"]:  # checked loosely, on the per-step checksums only
        del out["final"]
    return out


def main() -> None:
    out = {name: run(settings) for name, settings in cases().items()}
    path = write_fixture(
        "lora_pro",
        {
            "reference": f"mrflogs/LoRA-Pro@{COMMIT[:12]} {FILE} (lorapro_full_adjustment, solve_sylvester)"
            " + torch.optim.SGD",
            "version": COMMIT,
            "produced_by": "scripts/parity/lora_pro.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
