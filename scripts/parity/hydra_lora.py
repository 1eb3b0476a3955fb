"""Pin Hydra's layer from the authors' code: writes tests/fixtures/parity/hydra_lora.json.

    .venv/bin/python scripts/parity/hydra_lora.py

Reference: extremebird/Hydra at commit 4138457859666d49b9ca9e45473d8570586670bb:
  * nlu/src/transformers/models/adapter.py, class ``Hydra`` (bias-free down/up projections, Kaiming-
    uniform down, zero up), composed as the hydra branch of RobertaOutput.forward in
    nlu/src/transformers/models/roberta/modeling_roberta.py reads: h1 = dense(x), h = h1 + par(x) +
    seq(h1) (the released file cannot build it as written: ``config.hyrda_par_r`` and
    ``self.apply_hyra`` are misspelt, so the composition is written here, nothing else);
  * elevater/vision_benchmark/evaluation/Hydra_model.py, classes ``Hydra`` (biased projections, N(0,
    0.02) or Kaiming down, zero up and biases, a scale) and ``HydraMLP`` (the CLIP block's composition,
    run as it is).
Obtain them with the ``fetch`` tool (or git) and extract the two files:

    git --git-dir=<mirror> archive 4138457859666d49b9ca9e45473d8570586670bb \\
        nlu/src/transformers/models/adapter.py elevater/vision_benchmark/evaluation/Hydra_model.py \\
        | tar -x -C /tmp/parity/hydra/src

(or point HYDRA_SRC at another folder holding them). Each file is loaded on its own by path.

The case (tests/parity_one_linear.py): one pretrained 10 -> 8 linear layer with bias, seeded inputs and
upstream gradients, 12 steps of torch.optim.AdamW (weight decay on the 2-D tensors only, as the HF
Trainer's groups and ours). The reference modules are built right after torch.manual_seed(seed) and
their initial down-projections recorded as the init that ours loads. Cases:
  * reference_defaults: the authors' GLUE SST-2 script (hydra_par_r 4, hydra_seq_r 8, lr 6e-4, wd 0.1);
  * preset: conf/method/hydra_lora.yaml as it stands, lr 5e-4 (the leaderboard's), wd 0;
  * clip: elevater's HydraMLP (bottleneck 2 on both branches, biases, N(0, 0.02), s = 1), lr 1e-2, wd 0.01;
  * scaled: elevater's Hydra modules with scale 0.5 and Kaiming init (its "adaptformer" option),
    bottleneck 3, composed as HydraMLP, lr 1e-2.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_one_linear import OneLinear, plain, run  # noqa: E402

COMMIT = "4138457859666d49b9ca9e45473d8570586670bb"
SRC = Path(os.environ.get("HYDRA_SRC", "/tmp/parity/hydra/src"))
FILES = {
    "nlu": "nlu/src/transformers/models/adapter.py",
    "clip": "elevater/vision_benchmark/evaluation/Hydra_model.py",
}
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "hydra_lora.yaml"))
SHAPE = dict(d_in=10, d_out=8, batch=3, weight_seed=0, data_seed=1, steps=12, seed=5)


def load(key: str):
    path = SRC / FILES[key]
    if not path.is_file():
        sys.exit(f"the reference is absent: extract extremebird/Hydra@{COMMIT[:12]} {FILES[key]} into {SRC}")
    spec = importlib.util.spec_from_file_location(f"hydra_reference_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases() -> dict:
    preset_rank = PRESET["rank"]
    preset = {
        "rank": preset_rank,
        "seq_rank": PRESET["seq_rank"] or 2 * preset_rank,
        "bias": PRESET["bias"],
        "down_init": PRESET["down_init"],
        "scale": PRESET["scale"],
    }
    assert not preset["bias"] and preset["down_init"] == "kaiming" and preset["scale"] == 1.0, "nlu module only"
    return {
        "reference_defaults": {
            **SHAPE,
            "code": "nlu",
            "rank": 4,
            "seq_rank": 8,
            "lr": 6e-4,
            "weight_decay": 0.1,
            "ours": {"rank": 4, "seq_rank": 8},
        },
        "preset": {**SHAPE, "code": "nlu", **preset, "lr": 5e-4, "weight_decay": 0.0, "ours": {}},
        "clip": {
            **SHAPE,
            "code": "clip_mlp",
            "rank": 2,
            "seq_rank": 2,
            "lr": 1e-2,
            "weight_decay": 0.01,
            "ours": {"rank": 2, "seq_rank": 2, "bias": True, "down_init": "normal", "scale": 1.0},
        },
        "scaled": {
            **SHAPE,
            "code": "clip",
            "rank": 3,
            "seq_rank": 3,
            "scale": 0.5,
            "lr": 1e-2,
            "weight_decay": 0.0,
            "ours": {"rank": 3, "seq_rank": 3, "bias": True, "down_init": "kaiming", "scale": 0.5},
        },
    }


def reference_layer(modules: dict, case: dict, base: nn.Linear):
    """(forward, {shared name: tensor}) of the reference's branches around ``base``."""
    d_in, d_out = case["d_in"], case["d_out"]
    torch.manual_seed(case["seed"])
    if case["code"] == "nlu":
        par = modules["nlu"].Hydra(d_in, d_out, r=case["rank"])
        seq = modules["nlu"].Hydra(d_out, d_out, r=case["seq_rank"])

        def forward(x):  # RobertaOutput.forward's hydra branch, before its dropout and LayerNorm
            h1 = base(x)
            return h1 + par(x) + seq(h1)

        tensors = {
            "par_A": par.hydra_A.weight,
            "par_B": par.hydra_B.weight,
            "seq_A": seq.hydra_A.weight,
            "seq_B": seq.hydra_B.weight,
        }
        return forward, tensors
    if case["code"] == "clip_mlp":
        block = modules["clip"].HydraMLP(d_in, d_out)
        with torch.no_grad():
            block.linear.weight.copy_(base.weight)
            block.linear.bias.copy_(base.bias)
        block.linear.requires_grad_(False)
        par, seq, forward = block.adapter_par, block.adapter_seq, block
    else:
        option = {"kaiming": "adaptformer", "normal": "lora"}[case["ours"]["down_init"]]
        par = modules["clip"].Hydra(d_in, d_out, case["rank"], scale=str(case["scale"]), init_option=option)
        seq = modules["clip"].Hydra(d_out, d_out, case["seq_rank"], scale=str(case["scale"]), init_option=option)

        def forward(x):  # HydraMLP.forward's composition
            h1 = base(x)
            return h1 + par(x) + seq(h1)

    tensors = {}
    for prefix, branch in (("par", par), ("seq", seq)):
        tensors[f"{prefix}_A"], tensors[f"{prefix}_a"] = branch.down_proj.weight, branch.down_proj.bias
        tensors[f"{prefix}_B"], tensors[f"{prefix}_b"] = branch.up_proj.weight, branch.up_proj.bias
    return forward, tensors


def run_reference(modules: dict, case: dict) -> dict:
    base = OneLinear(case["d_in"], case["d_out"], case["weight_seed"]).lin
    base.requires_grad_(False)
    forward, tensors = reference_layer(modules, case, base)
    init = {n: plain(t) for n, t in tensors.items()}
    decay = [t for t in tensors.values() if t.ndim >= 2]
    no_decay = [t for t in tensors.values() if t.ndim < 2]
    groups = [{"params": decay, "weight_decay": case["weight_decay"]}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=case["lr"], betas=(PRESET["beta1"], PRESET["beta2"]), eps=PRESET["eps"])
    out = run(forward, tensors, optimizer, case)
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        final_output = plain(forward(x))
    return {"init": init, **out, "eval_input_seed": 99, "eval_output": final_output}


def main() -> None:
    modules = {key: load(key) for key in FILES}
    out = {}
    for name, case in cases().items():
        out[name] = {**case, **run_reference(modules, case)}
        print(f"{name}: {sorted(out[name]['init'])}")
    path = write_fixture(
        "hydra_lora",
        {
            "reference": f"extremebird/Hydra@{COMMIT[:12]} ({FILES['nlu']} Hydra; {FILES['clip']} Hydra, HydraMLP)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/hydra_lora.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
