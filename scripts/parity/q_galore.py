"""`.venv/bin/python scripts/parity/q_galore.py`

Pins the authors' Q-GaLore, pip q-galore-torch 1.0 (= VITA-Group/Q-GaLore@5bd2f1c5a1aed31223d7f15c4604c4d56cfe1e6,
q_galore_torch/q_galore_projector.py and q_galore_adamw8bit.py), on bitsandbytes 0.50.2, and writes
tests/fixtures/parity/q_galore.json. Both are installed outside the project venv:

    .venv/bin/pip install --no-deps --target /tmp/parity/q_galore/site q-galore-torch==1.0 bitsandbytes==0.50.2

(another folder: PARITY_Q_GALORE_SITE=...). What runs, and how:

* the reference's own pieces in pure PyTorch: bitsandbytes' dynamic maps (create_dynamic_map), the
  INT4/INT8 group quantizer of GaLoreProjector (``_quantize``) and GaLoreProjector itself (SVD,
  quantized storage, lazy refresh), driven for 40 steps on rank-1-plus-noise gradient streams of both
  sides (tests/parity_q_galore_case.py), at their defaults and at a second setting;
* the reference optimizer QGaLoreAdamW8bit (its ``step``: projection, bnb update of the low-rank
  tensor, projection back, decay), at the authors' defaults, at our preset (conf/method/q_galore.yaml),
  with a gap of 1 and 8-bit moments (min_8bit_size 256) on structured gradients for 24 steps, and on
  the shared parity problem (tests/parity_case.py) with group size 8 and every moment 8-bit.
  Harness shims (the authors' files stay untouched): torch.cuda.synchronize is a no-op (CPU torch);
  the constructor passes the authors' values to bnb 0.50.2's Optimizer2State by keyword (their
  positional call targets bnb 0.43.1, whose percentile_clipping/block_wise slots 0.50 no longer has);
  ``update_step`` is bnb 0.50.2's own dispatch (theirs calls 0.43.1 kernel signatures; its extra
  branch is the INT8-weight float_grad path, unused); and bnb's 8-bit blockwise update runs through
  bnb's pure-PyTorch port of it (backends/triton/kernels_optim.py, imported with triton stubbed: the
  port uses torch only), which takes the nearest map entry as the CUDA kernel does, where bnb's C++
  CPU kernel uses a coarser table search (the script prints how far that one lands).

Non-projected parameters get no weight decay in every case: bnb's CPU kernels decay before the
update, its CUDA kernels (and ours) after. Fixture: the pieces' outputs, per-step checksums, every
final parameter (base64 fp32) and each tensor's moment dtype / block count and projector SVD count,
gap and queue. tests/test_parity_q_galore.py runs lorabench's q_galore on the same cases and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SITE = Path(os.environ.get("PARITY_Q_GALORE_SITE", "/tmp/parity/q_galore/site"))
VERSION = "1.0"
BNB_VERSION = "0.50.2"
COMMIT = "5bd2f1c5a1aed31223d7f15c4604c4d56cfe1e6"

from tests import parity_case  # noqa: E402
from tests.parity_q_galore_case import (  # noqa: E402
    basis_data,
    blockwise_data,
    feed,
    other_params,
    packed_snapshot,
    projected_weights,
    projector_streams,
    q_galore_model,
    structured_gradients,
    unpack,
)


def reference():
    for package in ("q_galore_torch", "bitsandbytes"):
        if not (SITE / package).is_dir():
            sys.exit(
                f"{package} not found under {SITE}; install the reference with\n"
                f"  .venv/bin/pip install --no-deps --target {SITE} q-galore-torch=={VERSION} "
                f"bitsandbytes=={BNB_VERSION}"
            )
    sys.path.insert(0, str(SITE))
    torch.cuda.synchronize = lambda *args, **kwargs: None  # the reference syncs after every update; CPU torch
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
    import q_galore_torch
    from bitsandbytes.optim.optimizer import Optimizer2State
    from q_galore_torch.q_galore_projector import GaLoreProjector

    for module in (bitsandbytes, q_galore_torch):
        assert Path(module.__file__).resolve().is_relative_to(SITE.resolve()), module.__file__
    assert bitsandbytes.__version__ == BNB_VERSION, bitsandbytes.__version__

    stub = mock.MagicMock()  # the port's module imports triton at the top; the port itself is torch only
    with mock.patch.dict(sys.modules, {"triton": stub, "triton.language": stub.language}):
        from bitsandbytes.backends.triton import kernels_optim
    port = kernels_optim.optimizer_update_8bit_blockwise_pytorch

    cpu_kernel = bnb_functional.optimizer_update_8bit_blockwise

    def through_port(name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
                     absmax1, absmax2, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False):  # fmt: skip
        port(p, g, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2,
             weight_decay, gnorm_scale, skip_zeros, optimizer_name=name)  # fmt: skip

    class Reference(q_galore_torch.QGaLoreAdamW8bit):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096):
            Optimizer2State.__init__(
                self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=8,
                min_8bit_size=min_8bit_size,
            )  # fmt: skip

        def update_step(self, group, p, gindex, pindex, flag_use_float_grad=False):
            assert not flag_use_float_grad
            return Optimizer2State.update_step(self, group, p, gindex, pindex)

    def use_kernel(which: str) -> None:
        bnb_functional.optimizer_update_8bit_blockwise = through_port if which == "port" else cpu_kernel

    return {
        "Reference": Reference,
        "GaLoreProjector": GaLoreProjector,
        "create_dynamic_map": bnb_functional.create_dynamic_map,
        "quantize_blockwise": kernels_optim._quantize_blockwise_pytorch,
        "use_kernel": use_kernel,
    }


def preset() -> dict:
    conf = yaml.safe_load((ROOT / "conf" / "method" / "q_galore.yaml").read_text())
    keys = ("rank", "update_proj_gap", "scale", "proj_bits", "proj_group_size", "cos_threshold", "queue_size")
    keys += ("gamma_proj", "min_8bit_size", "beta1", "beta2", "eps")
    return {k: conf[k] for k in keys}


# ----------------------------------------------------------------------------- pieces


def maps(ref) -> dict:
    return {kind: ref["create_dynamic_map"](signed=kind == "signed").tolist() for kind in ("signed", "unsigned")}


def blockwise(ref) -> dict:
    """bnb's 8-bit blockwise codes and absmax of fixed data (tests/parity_q_galore_case.py)."""
    out = {}
    for kind in ("signed", "unsigned"):
        qmap = ref["create_dynamic_map"](signed=kind == "signed")
        codes, absmax = ref["quantize_blockwise"](blockwise_data(kind), qmap, 256)
        out[kind] = {"codes": codes.tolist(), "absmax": absmax.tolist()}
    return out


def group_quantizer(ref) -> dict:
    """GaLoreProjector._quantize on fixed bases in both stored layouts (B: 8 x 64, A: 64 x 8)."""
    out = {}
    for layout in ("right", "left"):
        for bits, group in ((4, 256), (8, 256), (4, -1)):
            quantize = ref["GaLoreProjector"](8)._quantize
            codes, scales, zeros, _ = quantize(basis_data(layout), q_group_size=group, n_bit=bits)
            out[f"{layout}_{bits}bit_g{group}"] = {
                "layout": layout,
                "bits": bits,
                "group_size": group,
                "codes": codes.reshape(-1).tolist(),
                "scales": scales.reshape(-1).tolist(),
                "zeros": zeros.reshape(-1).tolist(),
            }
    return out


PROJECTOR_STEPS = 40
PROJECTOR_SETTINGS = {
    "defaults": {"cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5, "n_bit": 4, "group_size": 256},
    "short_queue": {"cos_threshold": 0.8, "gamma_proj": 3, "queue_size": 3, "n_bit": 8, "group_size": -1},
}


def projector_runs(ref) -> dict:
    """GaLoreProjector(rank 8, gap 1, quantized) on each stream: SVD count, gap and the projection's
    sum / abs sum after every step, and the final queue."""
    out = {}
    for setting, kw in PROJECTOR_SETTINGS.items():
        for name, grads in projector_streams(PROJECTOR_STEPS).items():
            proj = ref["GaLoreProjector"](
                8, update_proj_gap=1, scale=1.0, proj_type="std", quant=True, group_size=kw["group_size"],
                n_bit=kw["n_bit"], cos_threshold=kw["cos_threshold"], gamma_proj=kw["gamma_proj"],
                queue_size=kw["queue_size"],
            )  # fmt: skip
            svds, gaps, low = [], [], []
            for t, g in enumerate(grads):
                r = proj.project(g, t).double()
                back = proj.project_back(r.float()).double()
                svds.append(proj.svd_count)
                gaps.append(proj.update_proj_gap)
                low.append([r.sum().item(), r.abs().sum().item(), back.abs().sum().item()])
            out[f"{setting}/{name}"] = {"settings": kw, "svd_count": svds, "gap": gaps, "low": low, "queue": proj.queue}
    return out


# ----------------------------------------------------------------------------- the optimizer


def cases() -> dict[str, dict]:
    ours = preset()
    defaults = {  # QGaLoreAdamW8bit's and run_pretrain.py's defaults (rank: theirs is 128 > every dimension here)
        **ours,
        "rank": 8,
        "update_proj_gap": 50,
        "scale": 1.0,
        "min_8bit_size": 4096,
        "eps": 1e-8,
    }
    return {
        "reference_defaults": {"model": "q_galore", "lr": 1e-3, "weight_decay": 1e-2, "steps": 12, "method": defaults},
        "preset": {"model": "q_galore", "lr": 1e-3, "weight_decay": 1e-2, "steps": 12, "method": ours},
        "lazy_8bit": {
            "model": "q_galore",
            "lr": 1e-2,
            "weight_decay": 0.1,
            "steps": 24,
            "method": {**ours, "update_proj_gap": 1, "min_8bit_size": 256},
        },
        "shared_case": {
            "model": "parity",
            "lr": 1e-2,
            "weight_decay": 0.1,
            "steps": 12,
            "method": {**ours, "rank": 4, "update_proj_gap": 3, "proj_group_size": 8, "min_8bit_size": 1},
        },
    }


def build_case(settings: dict):
    if settings["model"] == "parity":
        model = parity_case.parity_model()
        proj, rest = parity_case.projected_weights(model), parity_case.other_params(model)
        grads = parity_case.gradients(model, settings["steps"])
    else:
        model = q_galore_model()
        proj, rest = projected_weights(model), other_params(model)
        grads = structured_gradients(model, settings["steps"])
    return model, proj, rest, grads


def run(ref, settings: dict) -> dict:
    model, proj, rest, grads = build_case(settings)
    method = settings["method"]
    groups = [
        {"params": rest, "weight_decay": 0.0},
        {
            "params": proj,
            "weight_decay": settings["weight_decay"],
            "rank": method["rank"],
            "update_proj_gap": method["update_proj_gap"],
            "scale": method["scale"],
            "proj_type": "std",
            "quant": method["proj_bits"] != 32,
            "quant_n_bit": method["proj_bits"],
            "quant_group_size": method["proj_group_size"],
            "cos_threshold": method["cos_threshold"],
            "gamma_proj": method["gamma_proj"],
            "queue_size": method["queue_size"],
        },
    ]
    opt = ref["Reference"](
        groups,
        lr=settings["lr"],
        betas=(method["beta1"], method["beta2"]),
        eps=method["eps"],
        min_8bit_size=method["min_8bit_size"],
    )
    trajectory = feed(model, opt, grads)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for p in model.parameters():
        s = opt.state[p]
        entry = {"moments": str(s["state1"].dtype).replace("torch.", ""), "shape": list(s["state1"].shape)}
        if "absmax1" in s:
            entry["blocks"] = s["absmax1"].numel()
        if "projector" in s:
            pr = s["projector"]
            entry.update(svd_count=pr.svd_count, gap=pr.update_proj_gap, queue=list(pr.queue))
        state[names[id(p)]] = entry
    return {"settings": settings, "final": packed_snapshot(model), "trajectory": trajectory, "state": state}


def cpu_kernel_gap(ref, settings: dict, expected: dict) -> float:
    """How far the same case lands with bnb's C++ CPU 8-bit kernel instead of the port (printed only)."""
    ref["use_kernel"]("cpu")
    try:
        final = run(ref, settings)["final"]
    finally:
        ref["use_kernel"]("port")
    return max((unpack(final[k]) - unpack(expected["final"][k])).abs().max().item() for k in final)


def main() -> None:
    ref = reference()
    ref["use_kernel"]("port")
    out_cases = {name: run(ref, settings) for name, settings in cases().items()}
    for name in ("lazy_8bit", "shared_case"):
        gap = cpu_kernel_gap(ref, cases()[name], out_cases[name])
        print(f"{name}: bnb's C++ CPU 8-bit kernel lands max |Δθ| = {gap:.2e} from its PyTorch port")
    path = parity_case.write_fixture(
        "q_galore",
        {
            "reference": f"pip q-galore-torch=={VERSION} + bitsandbytes=={BNB_VERSION} (QGaLoreAdamW8bit)",
            "version": VERSION,
            "commit": COMMIT,
            "bitsandbytes": BNB_VERSION,
            "produced_by": "scripts/parity/q_galore.py",
            "maps": maps(ref),
            "blockwise": blockwise(ref),
            "group_quantizer": group_quantizer(ref),
            "projector": projector_runs(ref),
            "cases": out_cases,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
