"""Pin SALT's layer from the authors' code: writes tests/fixtures/parity/salt.json.

    .venv/bin/python scripts/parity/salt.py

Reference: BioMedIA-MBZUAI/SALT at commit 7314877a987221cbb499e836220a090c35fc60e1,
``prompt_adapted_SAM2/modeling/Adapters/SALT.py`` (``SALTLinear``, the layer the shipped SAM 2
config runs through ``prompt_adapted_SAM2/modeling/backbones/hieradet.py``). Obtain it with the
repository fetched as a bare git directory GIT_DIR:

    mkdir -p /tmp/parity/salt/src
    git --git-dir=GIT_DIR archive 7314877a987221cbb499e836220a090c35fc60e1 prompt_adapted_SAM2/modeling/Adapters \\
        | tar -x -C /tmp/parity/salt/src
    .venv/bin/pip install --no-deps --target /tmp/parity/salt/site einops==0.8.0   # the file imports it

(or point SALT_SRC / SALT_SITE elsewhere). Only that file is loaded (the SAM 2 package is bypassed).

The case is tests/test_parity_sora_salt_nola.py's (two targets, 12 seeded steps, a probe batch): each
target is a ``SALTLinear`` whose weight and bias are overwritten with the case's (its SVD is then taken
at the first forward, as in the authors' code after loading a checkpoint), the bias frozen (the
authors' ``salt`` strategy trains the ``trainable_*`` tensors), ``torch.optim.AdamW`` over the
trainable tensors. The authors' forward returns a regulariser too; their config weights it by 0, so
the loss here is the task loss. Cases: reference_defaults (ratio_salt 0.1 -> r = 1 on both targets,
r_lora 8, the authors' SAM 2 config's AdamW lr 1e-4 and weight decay 1e-2), preset
(conf/method/salt.yaml: r = 8, q = 8, ratio_salt chosen to give r = 8, lr 1e-3) and large_steps (the
preset at lr 3e-2: larger updates of S'). Every case ends with entries of S' below 0, cut by the ReLU
(``relu_clipped`` in the fixture).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.test_parity_sora_salt_nola import (  # noqa: E402
    PROBE,
    SHAPES,
    STEPS,
    Toy,
    base_linears,
    batches,
    checksums,
    f32,
    preset,
    probe,
    task_loss,
)

COMMIT = "7314877a987221cbb499e836220a090c35fc60e1"
SRC = Path(os.environ.get("SALT_SRC", "/tmp/parity/salt/src"))
SITE = Path(os.environ.get("SALT_SITE", "/tmp/parity/salt/site"))
FILE = SRC / "prompt_adapted_SAM2" / "modeling" / "Adapters" / "SALT.py"
PRESET = preset("salt")
NAMES = {
    "sv_scale": "trainable_scale_A",
    "sv_shift": "trainable_shift_B",
    "lora_X": "trainable_X",
    "lora_Y": "trainable_Y",
}


def salt_linear():
    if not FILE.is_file():
        sys.exit(f"the reference is missing: {FILE} (see this script's docstring)")
    sys.path.insert(0, str(SITE))
    spec = importlib.util.spec_from_file_location("salt_reference", FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SALTLinear


class FirstOutput(nn.Module):
    """The authors' layer returns (output, regulariser); the model uses the output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def run_case(cls, s: dict) -> dict:
    bases, layers = base_linears(), {}
    for name, (d_in, d_out) in SHAPES.items():
        layer = cls(d_in, d_out, ratio_salt=s["ratio_salt"][name], r_lora=s["lora_rank"])
        with torch.no_grad():
            layer.weight.copy_(bases[name].weight)
            layer.bias.copy_(bases[name].bias)
        layer.bias.requires_grad_(False)
        layers[name] = layer
    assert {n: m.rank for n, m in layers.items()} == s["r"], {n: m.rank for n, m in layers.items()}
    model = Toy(FirstOutput(layers["t1"]), FirstOutput(layers["t2"]))
    params = {f"{n}.{ours}": getattr(m, theirs) for n, m in layers.items() for ours, theirs in NAMES.items()}
    assert all(p.requires_grad for p in params.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.layer.{theirs}" for n in layers for theirs in NAMES.values()
    }
    init = {k: f32(p) for k, p in params.items() if k.endswith("lora_X")}  # scale 1, shift 0, Y 0: ours too
    optimizer = torch.optim.AdamW(list(params.values()), lr=s["lr"], weight_decay=s["weight_decay"])

    def forward_loss(x, g):
        y = model(x)
        return y, task_loss(y, g)

    out = {"settings": s, "init": init, "probe_init": probe(lambda: forward_loss(*PROBE), params)}
    out["losses"], out["trajectory"] = [], []
    for x, g in batches(STEPS):
        _, loss = forward_loss(x, g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["losses"].append(loss.item())
        out["trajectory"].append(checksums(params))
    out["final"] = {k: f32(p) for k, p in params.items()}
    out["probe_final"] = probe(lambda: forward_loss(*PROBE), params)
    with torch.no_grad():  # entries of S' below 0 at the end: what the ReLU cut
        out["relu_clipped"] = sum(int((m.get_modified_singular_values()[0] < 0).sum()) for m in layers.values())
    return out


def ratio_for(r: int) -> dict[str, float]:
    """ratio_salt giving max(1, int(ratio * k)) = r on every target."""
    return {n: (r + 0.5) / min(shape) for n, shape in SHAPES.items()}


def main() -> None:
    cls = salt_linear()
    r, q = PRESET["rank"], PRESET["lora_rank"]
    preset_settings = dict(
        rank=r, rank_ratio=PRESET["rank_ratio"], lora_rank=q, ratio_salt=ratio_for(r), r={n: r for n in SHAPES}
    )
    cases = {
        "reference_defaults": dict(
            rank=None,
            rank_ratio=0.1,
            lora_rank=8,
            ratio_salt={n: 0.1 for n in SHAPES},
            r={"t1": 1, "t2": 1},
            lr=1e-4,
            weight_decay=1e-2,
        ),
        "preset": dict(**preset_settings, lr=1e-3, weight_decay=0.0),
        "large_steps": dict(**preset_settings, lr=3e-2, weight_decay=0.0),
    }
    out = {name: run_case(cls, s) for name, s in cases.items()}
    for name, case in out.items():
        print(f"{name}: entries cut by the ReLU {case['relu_clipped']}, last loss {case['losses'][-1]:.5f}")
    path = write_fixture(
        "salt",
        {
            "reference": f"BioMedIA-MBZUAI/SALT@{COMMIT[:12]} {FILE.relative_to(SRC)} (SALTLinear)",
            "version": COMMIT,
            "produced_by": "scripts/parity/salt.py",
            "steps": STEPS,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
