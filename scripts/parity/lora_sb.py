"""Pin LoRA-SB's init and training from the authors' code: writes tests/fixtures/parity/lora_sb.json.

    .venv/bin/python scripts/parity/lora_sb.py

Reference: RaghavSinghal10/lora-sb at commit 37b33d4c4c573de20f314bc1231b84ee49771759:
``utils/gradient_utils.py`` (``estimate_and_process_grads_torch``: sums each batch's gradient of
loss / batch size over ``num_samples`` samples, returns -lr sign(G)), ``utils/initialization_utils.py``
(``find_and_initialize_grad``: ``get_svd_grad`` of U1^T, i.e. ``torch.svd_lowrank(q=r, niter=10)``
after ``torch.manual_seed(42)``, factors rounded to bfloat16; lora_B = V, lora_A = U^T, a latent
r x r ``nn.Linear`` holding diag(S); W0 untouched) and ``utils/latent_utils.py`` (``forward_latent``),
on the peft it pins, 0.13.2, as train_glue.py wires them (lora_alpha = r, eff_lr = lr /
(warmup_ratio * total steps), torch.optim.AdamW with its default weight decay 0.01). Obtain them with

    git --git-dir=<mirror> archive 37b33d4c4c573de20f314bc1231b84ee49771759 utils config \\
        | tar -x -C /tmp/parity/lora_sb/src
    .venv/bin/pip install --no-deps --target /tmp/parity/lora_sb/site peft==0.13.2

(or point LORA_SB_SRC / LORA_SB_SITE elsewhere); accelerate comes from the project's environment.

The case (tests/parity_one_linear.py): one pretrained linear layer with bias wrapped by peft on
``lin``; calibration batches of seeded (input_ids, labels) pairs whose loss is sum(h * labels); then 12
training steps of seeded inputs and upstream gradients (constant lr: the schedule is the loop's, not
the adapter's). Recorded: U1 (the processed gradient), the initial lora_B, lora_A, R, and the training
trajectory. Cases:
  * reference_defaults: train_glue.py's GLUE setting on a 10 -> 8 layer (r 4, as its 24 exceeds the
    layer; lr 1e-3, warmup 0.06 of 50 steps, num_samples 2: the first two samples of one batch);
  * preset: conf/method/lora_sb.yaml as it stands on a 24 -> 24 layer (its rank), lr 5e-3 (the
    leaderboard's), warmup 0.06 of 100 steps, two calibration batches of 4 samples, weight decay 0.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_one_linear import OneLinear, calibration, plain, run  # noqa: E402

COMMIT = "37b33d4c4c573de20f314bc1231b84ee49771759"
PEFT = "0.13.2"
SRC = Path(os.environ.get("LORA_SB_SRC", "/tmp/parity/lora_sb/src"))
SITE = Path(os.environ.get("LORA_SB_SITE", "/tmp/parity/lora_sb/site"))
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "lora_sb.yaml"))


def reference():
    if not (SRC / "utils" / "initialization_utils.py").is_file() or not (SITE / "peft").is_dir():
        sys.exit(
            f"the reference is absent: see the docstring (lora-sb@{COMMIT[:12]} into {SRC}, peft=={PEFT} into {SITE})"
        )
    sys.path[:0] = [str(SITE), str(SRC)]
    import peft

    assert peft.__version__ == PEFT, peft.__version__
    from utils.gradient_utils import estimate_and_process_grads_torch
    from utils.initialization_utils import find_and_initialize_grad

    return peft, estimate_and_process_grads_torch, find_and_initialize_grad


def cases() -> dict:
    return {
        "reference_defaults": {
            "d_in": 10,
            "d_out": 8,
            "batch": 3,
            "weight_seed": 0,
            "data_seed": 1,
            "steps": 12,
            "rank": 4,
            "lr": 1e-3,
            "weight_decay": 0.01,
            "warmup_ratio": 0.06,
            "max_steps": 50,
            "num_samples": 2,
            "calib_seed": 2,
            "calib_batches": 1,
            "calib_batch": 2,
            "ours": {"rank": 4, "scale": 1.0, "warmup_ratio": 0.06},
        },
        "preset": {
            "d_in": 24,
            "d_out": 24,
            "batch": 2,
            "weight_seed": 0,
            "data_seed": 1,
            "steps": 12,
            "rank": PRESET["rank"],
            "lr": 5e-3,
            "weight_decay": 0.0,
            "warmup_ratio": PRESET["warmup_ratio"],
            "max_steps": 100,
            "num_samples": 8,
            "calib_seed": 2,
            "calib_batches": 2,
            "calib_batch": 4,
            "ours": {},
        },
    }


def run_reference(peft, estimate, initialize, case: dict) -> dict:
    model = OneLinear(case["d_in"], case["d_out"], case["weight_seed"])
    loader = torch.utils.data.DataLoader(
        [{k: v[i] for k, v in b.items()} for b in calibration(case) for i in range(case["calib_batch"])],
        batch_size=case["calib_batch"],
        shuffle=False,
    )
    eff_lr = case["lr"] / (case["warmup_ratio"] * case["max_steps"])  # train_glue.py
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        grads = estimate(model=model, dataloader=loader, lr=eff_lr, num_samples=case["num_samples"])
    config = peft.LoraConfig(r=case["rank"], lora_alpha=case["rank"], lora_dropout=0.0, target_modules=["lin"])
    model = peft.get_peft_model(model, config)
    reconstruct = yaml.safe_load((SRC / "config" / "reconstruct_config.yaml").read_text())
    reconstruct["svd"]["rank"] = case["rank"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.tensor(tensor) copies
            initialize(
                model=model,
                peft_config={"default": config},
                adapter_name="default",
                reconstr_type="svd",
                reconstruct_config=reconstruct,
                writer=None,
                named_grads={"base_model.model." + k: v for k, v in grads.items()},
            )
    layer = model.base_model.model.lin
    assert layer.scaling["default"] == 1.0
    latent = layer.default_lora_latent_mapping.weight
    init = {
        "lora_B": plain(layer.lora_B["default"].weight),
        "lora_A": plain(layer.lora_A["default"].weight),
        "lora_R": plain(latent),
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is latent
    optimizer = torch.optim.AdamW(model.parameters(), lr=case["lr"], weight_decay=case["weight_decay"])
    out = run(lambda x: model(x), {"lora_R": latent}, optimizer, case)
    return {"update": plain(grads["lin.weight"]), "eff_lr": eff_lr, "init": init, **out}


def main() -> None:
    peft, estimate, initialize = reference()
    out = {}
    for name, case in cases().items():
        out[name] = {**case, **run_reference(peft, estimate, initialize, case)}
        diag = [round(row[i], 6) for i, row in enumerate(out[name]["init"]["lora_R"])][:4]
        print(f"{name}: eff_lr {out[name]['eff_lr']:.3g}, R diag {diag}")
    path = write_fixture(
        "lora_sb",
        {
            "reference": f"RaghavSinghal10/lora-sb@{COMMIT[:12]} (utils/gradient_utils.py, initialization_utils.py,"
            f" latent_utils.py) on peft {PEFT}",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "peft": PEFT,
            "produced_by": "scripts/parity/lora_sb.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
