"""Pin SLTrain's layer from the authors' code: writes tests/fixtures/parity/sltrain.json.

    .venv/bin/python scripts/parity/sltrain.py

Reference: andyjm3/SLTrain at commit 2335d62c75df9b0f0441604eb04fde21b06693e4:
  * splora/splora_linear.py, class ``SpLoRaLinear`` (A Kaiming uniform, B = 0, a random fixed support of
    int(sp_ratio d_out d_in) sorted flat indices from torch.randperm, values U(-1/sqrt(d_in), 1/sqrt(d_in)),
    scale lora_alpha / r applied to A) and its autograd Function ``lora_sparse_linear``;
  * sparse-lora/sparse_linear.cpp, the C++ op ``sltrain_linear`` (forward: W = B A, W.flat[idx] += v,
    linear(x, W); backward: dense dL/dW, B's and A's gradients through it, v's gathered on idx), built
    here with torch.utils.cpp_extension.load (the authors build it with ``pip install .``; same source).
Obtain them with the ``fetch`` tool (or git) and extract the two folders:

    git --git-dir=<mirror> archive 2335d62c75df9b0f0441604eb04fde21b06693e4 splora sparse-lora \\
        | tar -x -C /tmp/sltrain_work/src

(or point SLTRAIN_SRC at another folder holding them; SLTRAIN_BUILD names the extension's build folder).
splora_linear.py is loaded on its own by path (the package's __init__ imports transformers for
SpLoRaModel, which is not needed).

The case (tests/parity_one_linear.py): one pretrained 24 -> 16 linear layer with bias, frozen, seeded
inputs and upstream gradients, 12 steps of torch.optim.AdamW (weight decay on the 2-D tensors only, as
ours). SLTrain replaces a layer for pretraining; as a fine-tuning adapter it is composed as
h = W0 x + b0 + SpLoRaLinear(bias=False)(x), nothing else changed. The reference layer is built right
after torch.manual_seed(seed); its initial A, B, values and support are recorded as the init that ours
loads. Cases:
  * authors_init: their init as it is (values drawn), rank 4, lora_alpha 32 (their default), sp_ratio 0.03,
    lr 3e-3 and weight decay 0 (their scripts);
  * preset: conf/method/sltrain.yaml as it stands (values zero: their sparse_value is zeroed after
    construction, the only change), lr 5e-4, weight decay 0;
  * dense_decay: rank 2, lora_alpha 2, sp_ratio 0.3, their drawn values, lr 1e-2, weight decay 0.01.
Besides, ``support_draws``: their ``_init_sparse_parameters`` called right after torch.manual_seed(seed)
on a few shapes and densities, so that the test checks our support draw on a generator in the same state.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_one_linear import OneLinear, plain, run  # noqa: E402

COMMIT = "2335d62c75df9b0f0441604eb04fde21b06693e4"
SRC = Path(os.environ.get("SLTRAIN_SRC", "/tmp/sltrain_work/src"))
BUILD = Path(os.environ.get("SLTRAIN_BUILD", "/tmp/sltrain_work/build"))
FILES = {"layer": "splora/splora_linear.py", "op": "sparse-lora/sparse_linear.cpp"}
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "sltrain.yaml"))
SHAPE = dict(d_in=24, d_out=16, batch=3, weight_seed=0, data_seed=1, steps=12, seed=5)
DRAWS = [(16, 24, 0.03, 5), (64, 48, 0.03, 0), (48, 64, 0.01, 1), (32, 32, 0.3, 2)]  # d_out, d_in, density, seed


def load():
    for rel in FILES.values():
        if not (SRC / rel).is_file():
            sys.exit(f"the reference is absent: extract andyjm3/SLTrain@{COMMIT[:12]} {rel} into {SRC}")
    from torch.utils.cpp_extension import load as load_extension

    BUILD.mkdir(parents=True, exist_ok=True)
    op = load_extension(name="sltrain_linear", sources=[str(SRC / FILES["op"])], build_directory=str(BUILD))
    sys.modules["sltrain_linear"] = op  # what splora_linear.py imports
    spec = importlib.util.spec_from_file_location("sltrain_reference_layer", SRC / FILES["layer"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases() -> dict:
    assert PRESET["sltrain_value_init"] == "zero"
    preset = {"rank": PRESET["rank"], "alpha": PRESET["alpha"], "density": PRESET["sltrain_density"], "values": "zero"}
    return {
        "authors_init": {
            **SHAPE,
            "rank": 4,
            "alpha": 32.0,
            "density": 0.03,
            "values": "drawn",
            "lr": 3e-3,
            "weight_decay": 0.0,
            "ours": {"rank": 4, "alpha": 32.0, "sltrain_density": 0.03, "sltrain_value_init": "uniform"},
        },
        "preset": {**SHAPE, **preset, "lr": 5e-4, "weight_decay": 0.0, "ours": {}},
        "dense_decay": {
            **SHAPE,
            "rank": 2,
            "alpha": 2.0,
            "density": 0.3,
            "values": "drawn",
            "lr": 1e-2,
            "weight_decay": 0.01,
            "ours": {"rank": 2, "alpha": 2.0, "sltrain_density": 0.3, "sltrain_value_init": "uniform"},
        },
    }


def run_reference(module, case: dict) -> dict:
    base = OneLinear(case["d_in"], case["d_out"], case["weight_seed"]).lin
    base.requires_grad_(False)
    torch.manual_seed(case["seed"])
    ref = module.SpLoRaLinear(
        case["d_in"], case["d_out"], case["rank"], sp_ratio=case["density"], lora_alpha=case["alpha"], bias=False
    )
    if case["values"] == "zero":
        with torch.no_grad():
            ref.sparse_value.zero_()
    assert ref.scaling == case["alpha"] / case["rank"]

    def forward(x: torch.Tensor) -> torch.Tensor:  # the frozen pretrained layer plus their layer
        return base(x) + ref(x)

    tensors = {"lora_A": ref.lora_A, "lora_B": ref.lora_B, "sparse_value": ref.sparse_value}
    init = {n: plain(t) for n, t in tensors.items()}
    support = ref.sparse_index.tolist()
    groups = [
        {"params": [ref.lora_A, ref.lora_B], "weight_decay": case["weight_decay"]},
        {"params": [ref.sparse_value], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=case["lr"], betas=(PRESET["beta1"], PRESET["beta2"]), eps=PRESET["eps"])
    out = run(forward, tensors, optimizer, case)
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        final_output = plain(forward(x))
        dense = ref.lora_B @ (ref.lora_A * ref.scaling)
        dense.view(-1).scatter_add_(0, ref.sparse_index, ref.sparse_value)
    return {
        "init": init,
        "support": support,
        **out,
        "eval_input_seed": 99,
        "eval_output": final_output,
        "final_delta_weight": plain(dense),  # the authors' op's W = B (s A) + scatter(S)
    }


def support_draws(module) -> list[dict]:
    out = []
    for d_out, d_in, density, seed in DRAWS:
        layer = module.SpLoRaLinear(d_in, d_out, 1, sp_ratio=density, bias=False)
        torch.manual_seed(seed)
        index, values, _ = layer._init_sparse_parameters()
        shape = {"d_out": d_out, "d_in": d_in, "density": density, "seed": seed}
        out.append({**shape, "index": index.tolist(), "values": plain(values)})
    return out


def main() -> None:
    module = load()
    out = {}
    for name, case in cases().items():
        out[name] = {**case, **run_reference(module, case)}
        print(f"{name}: {len(out[name]['support'])} support entries, {sorted(out[name]['init'])}")
    draws = support_draws(module)
    path = write_fixture(
        "sltrain",
        {
            "reference": f"andyjm3/SLTrain@{COMMIT[:12]} ({FILES['layer']} SpLoRaLinear; {FILES['op']})",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/sltrain.py",
            "cases": out,
            "support_draws": draws,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
