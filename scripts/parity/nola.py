"""Pin NOLA's layer from the authors' code: writes tests/fixtures/parity/nola.json.

    .venv/bin/python scripts/parity/nola.py

Reference: UCDvision/NOLA at commit 03c7027c244b5ab16de540dd8e37ea4b4e614129, ``gpt/src/model_nola.py``
(``LoRA`` with ``use_nola=True``, ``NOLALinear``, ``GenerateParams``; it imports ``gpt/loralib``).
Obtain it with the repository fetched as a bare git directory GIT_DIR:

    mkdir -p /tmp/parity/nola/src
    git --git-dir=GIT_DIR archive 03c7027c244b5ab16de540dd8e37ea4b4e614129 gpt/src/model_nola.py gpt/loralib \\
        | tar -x -C /tmp/parity/nola/src

(or point NOLA_SRC elsewhere). It needs torch only.

The case is tests/test_parity_sora_salt_nola.py's (two targets, 12 seeded steps, a probe batch): each
target gets the authors' parallel ``LoRA`` module (their GPT-2 attention adds ``lora(x)`` to the frozen
projection), built after ``torch.manual_seed(0)``; its integer basis seeds (drawn by ``NOLALinear``
from the global generator) and its frozen A0 (``lora_A.weight``, Kaiming) are pinned. The bases the
reference uses are read back through its own ``GenerateParams`` (one one-hot coefficient vector per
basis) and pinned as sha256 of their float32 bytes: lorabench draws its bases from the same integer
seeds and must reproduce them bit for bit (CPU generator). ``torch.optim.AdamW`` over the
coefficients on both sides. Pinned: the probe's outputs and gradients before the steps, the loss and
checksums at every step, the coefficients after them and the probe's outputs then (its gradients are
left out to keep the fixture small). Cases: reference_defaults (gpt2_ft.py's defaults: rank 8, 1024 bases,
lora_alpha 1; lr 5e-3 of the E2E script) and preset (conf/method/nola.yaml = the GPT-2 M E2E script:
rank 8, 512 bases, lora_alpha 8, lr 5e-3).
"""

from __future__ import annotations

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
    sha256,
    task_loss,
)

COMMIT = "03c7027c244b5ab16de540dd8e37ea4b4e614129"
SRC = Path(os.environ.get("NOLA_SRC", "/tmp/parity/nola/src"))
PRESET = preset("nola")


def reference():
    if not (SRC / "gpt" / "src" / "model_nola.py").is_file():
        sys.exit(f"the reference is missing: {SRC}/gpt/src/model_nola.py (see this script's docstring)")
    sys.path[:0] = [str(SRC / "gpt" / "src"), str(SRC / "gpt")]
    import model_nola

    return model_nola


class Parallel(nn.Module):
    """The frozen projection plus the authors' NOLA ``LoRA`` branch, as their GPT-2 attention adds it."""

    def __init__(self, base: nn.Linear, nola: nn.Module):
        super().__init__()
        self.base, self.nola = base, nola

    def forward(self, x):
        return self.base(x) + self.nola(x)


def read_bases(ref, module) -> torch.Tensor:
    """The reference's bases of one ``NOLALinear``, (num_basis, out, in), through its own generator."""
    k = module.num_basis
    eye = torch.eye(k)
    with torch.no_grad():
        return torch.stack(
            [ref.GenerateParams.apply(eye[i], module.out_features, module.in_features, module.seed) for i in range(k)]
        )


def run_case(ref, s: dict) -> dict:
    torch.manual_seed(0)
    bases, layers = base_linears(), {}
    for name, (d_in, d_out) in SHAPES.items():
        nola = ref.LoRA(d_in, d_out, use_nola=True, num_basis=s["num_basis"], rank=s["rank"], alpha=s["alpha"])
        layers[name] = Parallel(bases[name], nola)
    model = Toy(layers["t1"], layers["t2"])
    params = {
        f"{n}.{ours}": getattr(m.nola, side).coefficients
        for n, m in layers.items()
        for ours, side in (("coef_A", "lora_A"), ("coef_B", "lora_B"))
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.nola.lora_{side}.coefficients" for n in layers for side in "AB"
    }
    assert all(not p.any() for p in params.values()) and all(not m.nola.lora_B.weight.any() for m in layers.values())
    frozen = {}
    for name, m in layers.items():
        frozen[f"{name}.seed_A"], frozen[f"{name}.seed_B"] = int(m.nola.lora_A.seed), int(m.nola.lora_B.seed)
        frozen[f"{name}.lora_A0"] = f32(m.nola.lora_A.weight)
        frozen[f"{name}.basis_A_sha256"] = sha256(read_bases(ref, m.nola.lora_A))  # (k, r, d_in)
        frozen[f"{name}.basis_B_sha256"] = sha256(read_bases(ref, m.nola.lora_B))  # (l, d_out, r)
    optimizer = torch.optim.AdamW(list(params.values()), lr=s["lr"], weight_decay=0.0)

    def forward_loss(x, g):
        y = model(x)
        return y, task_loss(y, g)

    out = {"settings": s, "frozen": frozen, "probe_init": probe(lambda: forward_loss(*PROBE), params)}
    out["losses"], out["trajectory"] = [], []
    for x, g in batches(STEPS):
        _, loss = forward_loss(x, g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["losses"].append(loss.item())
        out["trajectory"].append(checksums(params))
    out["final"] = {k: f32(p) for k, p in params.items()}
    out["probe_final"] = {"outputs": probe(lambda: forward_loss(*PROBE), params)["outputs"]}  # small fixture
    return out


def main() -> None:
    ref = reference()
    assert PRESET["num_basis_a"] == PRESET["num_basis_b"]
    cases = {
        "reference_defaults": dict(rank=8, num_basis=1024, alpha=1.0, lr=5e-3),
        "preset": dict(rank=PRESET["rank"], num_basis=PRESET["num_basis_a"], alpha=PRESET["alpha"], lr=5e-3),
    }
    out = {name: run_case(ref, s) for name, s in cases.items()}
    for name, case in out.items():
        print(f"{name}: last loss {case['losses'][-1]:.5f}")
    path = write_fixture(
        "nola",
        {
            "reference": f"UCDvision/NOLA@{COMMIT[:12]} gpt/src/model_nola.py (LoRA with use_nola, NOLALinear)",
            "version": COMMIT,
            "produced_by": "scripts/parity/nola.py",
            "steps": STEPS,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
