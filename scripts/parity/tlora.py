"""Pin TLoRA's layer from the authors' code: writes tests/fixtures/parity/tlora.json.

    .venv/bin/python scripts/parity/tlora.py

Reference: the authors' taozerui/tlora_diffusion, whose code is stored here as the copy marcocst/PEFTDiff
at commit 9c56d00bcbe662fe5910dc432e98bccfb05191d9 (README identical to the authors'; the official
repository itself has no snapshot here): subject-driven-generation/utils/attention_processor.py, class
``TTMLoRALinearLayer`` (transform cores eye / R_T, or eye for R_T = 1 as Kronecker factors; the 'ttv'
tensor-ring residual with its first output core zero, or 'lora' with B = 0 and A Kaiming normal; scale
alpha / sqrt(rank); forward linear(x, W0 @ T + scale * Delta, b0)) with the helpers ``ttm_to_matrix``,
``ttv_to_matrix`` and ``seq_kronecker``. No snapshot could be fetched, so the file was read with the
``read_file`` tool (repo marcocst/PEFTDiff, that path and commit) and saved as

    $TLORA_SRC/subject-driven-generation/utils/attention_processor.py   (TLORA_SRC default /tmp/tlora_work/src)

(its module header, the three helpers and the class suffice: the file's other classes, the UNet
attention and its processor, only route to_q/to_k/to_v/to_out.0 through ``TTMLoRALinearLayer.forward``).
It is loaded on its own by path.

The case (tests/parity_one_linear.py): one pretrained 24 -> 16 linear layer with bias, frozen, seeded
inputs and upstream gradients, 12 steps of torch.optim.AdamW over every core (the authors' optimizer:
every tensor decayed alike, as lorabench's decay groups do for these >= 2-D tensors). Widths split as
ours splits them (lorabench.methods.adapters.tlora.tensor_modes, three modes): 24 = 2 x 3 x 4 and
16 = 2 x 2 x 4 (the test checks that ours picks these). The reference layer is built right after
torch.manual_seed(seed) and its initial cores are recorded as the init that ours loads. Cases:
  * preset: conf/method/tlora.yaml as it stands (R_T 2, 'ttv' residual of rank 6, alpha 1), lr 5e-3 and the
    authors' weight decay 1e-4;
  * kronecker_lora: the authors' subject-driven script (run_tlora.sh: transform_rank 1, addition_part lora,
    rank 1, alpha 1), lr 1e-3, weight decay 1e-4;
  * ring3_decay: R_T 3 (1/3 is inexact in fp32), 'ttv' rank 2, alpha 2, lr 1e-2, weight decay 0.01;
  * residual_only: transform_rank 0 (no transform), 'ttv' rank 3, alpha 1, lr 5e-3, weight decay 0.
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

REPO = "marcocst/PEFTDiff"
COMMIT = "9c56d00bcbe662fe5910dc432e98bccfb05191d9"
SRC = Path(os.environ.get("TLORA_SRC", "/tmp/tlora_work/src"))
FILE = "subject-driven-generation/utils/attention_processor.py"
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "tlora.yaml"))
SHAPE = dict(d_in=24, d_out=16, batch=3, weight_seed=0, data_seed=1, steps=12, seed=5)
IN_MODES, OUT_MODES = [2, 3, 4], [2, 2, 4]  # 24 and 16 in three modes, as tensor_modes splits them


def load():
    if not (SRC / FILE).is_file():
        sys.exit(f"the reference is absent: save {REPO}@{COMMIT[:12]} {FILE} under {SRC}")
    spec = importlib.util.spec_from_file_location("tlora_reference_layer", SRC / FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases() -> dict:
    assert (PRESET["tlora_residual"], PRESET["tlora_modes"]) == ("tr", 3)
    preset = {"transform_rank": PRESET["tlora_transform_rank"], "rank": PRESET["rank"], "alpha": PRESET["alpha"]}
    return {
        "preset": {**SHAPE, **preset, "addition_part": "ttv", "lr": 5e-3, "weight_decay": 1e-4, "ours": {}},
        "kronecker_lora": {
            **SHAPE,
            "transform_rank": 1,
            "rank": 1,
            "alpha": 1.0,
            "addition_part": "lora",
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "ours": {"tlora_transform_rank": 1, "tlora_residual": "lora", "rank": 1, "alpha": 1.0},
        },
        "ring3_decay": {
            **SHAPE,
            "transform_rank": 3,
            "rank": 2,
            "alpha": 2.0,
            "addition_part": "ttv",
            "lr": 1e-2,
            "weight_decay": 0.01,
            "ours": {"tlora_transform_rank": 3, "rank": 2, "alpha": 2.0},
        },
        "residual_only": {
            **SHAPE,
            "transform_rank": 0,
            "rank": 3,
            "alpha": 1.0,
            "addition_part": "ttv",
            "lr": 5e-3,
            "weight_decay": 0.0,
            "ours": {"tlora_transform_rank": 0, "rank": 3, "alpha": 1.0},
        },
    }


def named_tensors(ref) -> dict[str, torch.nn.Parameter]:
    """The reference's trainable tensors under our layer's names."""
    out = {}
    for d, core in enumerate(ref.transform_core or []):
        out[f"transform_cores.{d}"] = core
    if ref.addition_part == "lora":
        out["lora_A"], out["lora_B"] = ref.lora_A, ref.lora_B
    else:  # ttv_core = [output cores..., input cores...]
        n_out = len(ref.out_tensor_shape)
        for d, core in enumerate(ref.ttv_core):
            out[f"residual_out.{d}" if d < n_out else f"residual_in.{d - n_out}"] = core
    return out


def run_reference(module, case: dict) -> dict:
    base = OneLinear(case["d_in"], case["d_out"], case["weight_seed"]).lin
    base.requires_grad_(False)
    torch.manual_seed(case["seed"])
    ref = module.TTMLoRALinearLayer(
        case["d_in"],
        case["d_out"],
        in_tensor_shape=IN_MODES,
        out_tensor_shape=OUT_MODES,
        rank=case["rank"],
        transform_rank=case["transform_rank"],
        alpha=case["alpha"],
        addition_part=case["addition_part"],
        use_rslora=True,
    )

    def forward(x: torch.Tensor) -> torch.Tensor:  # their forward takes the frozen linear as ``attn``
        return ref(base, x)

    tensors = named_tensors(ref)
    init = {n: plain(t) for n, t in tensors.items()}
    optimizer = torch.optim.AdamW(
        list(tensors.values()),
        lr=case["lr"],
        betas=(PRESET["beta1"], PRESET["beta2"]),
        eps=PRESET["eps"],
        weight_decay=case["weight_decay"],
    )
    x0 = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(98))
    with torch.no_grad():
        init_gap = (forward(x0) - base(x0)).abs().max().item()  # their model at step 0 against W0
    out = run(forward, tensors, optimizer, case)
    x = torch.randn(case["batch"], case["d_in"], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        final_output = plain(forward(x))
        eye = torch.eye(case["d_in"])
        w = base.weight.data
        # their dense weight W0 T + s Delta, read back through their forward on the identity (bias removed)
        dense = (ref(base, eye) - base.bias).T
    return {
        "init": init,
        **out,
        "init_output_gap": init_gap,
        "eval_input_seed": 99,
        "eval_output": final_output,
        "final_delta_weight": plain(dense - w),  # W0 T + s Delta - W0
    }


def main() -> None:
    module = load()
    out = {}
    for name, case in cases().items():
        out[name] = {**case, **run_reference(module, case)}
        print(f"{name}: {sorted(out[name]['init'])}, step-0 gap to W0 {out[name]['init_output_gap']:.3g}")
    path = write_fixture(
        "tlora",
        {
            "reference": f"{REPO}@{COMMIT[:12]} ({FILE} TTMLoRALinearLayer; the authors' taozerui/tlora_diffusion)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/tlora.py",
            "in_modes": IN_MODES,
            "out_modes": OUT_MODES,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
