"""Pin LQ-LoRA's decomposition and bit-allocation ILP from the authors' code: writes
tests/fixtures/parity/lq_lora.json.

    .venv/bin/python scripts/parity/lq_lora.py

Reference: HanGuo97/lq-lora at commit c2424b3adc27197815da1ac9e1304565168d824d,
``models/lq_utils.py``: ``lowrank_quantized_sparse_decomposition`` (from Q = 0: L1 L2 = SVD_r(A - Q),
Q = quantize(A - L1 L2), stop when the Frobenius error rises) with ``randomized=False`` (an exact
SVD, as lorabench uses), and ``mip_solve(..., backend="scipy")`` (the ILP). Obtain it with the
``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive c2424b3adc27197815da1ac9e1304565168d824d models | tar -x -C /tmp/parity/lq_lora/src

(or point LQ_LORA_SRC at another folder holding ``models/lq_utils.py``). Only ``lq_utils`` and
``factorizations_utils`` run: the modules they import for CUDA quantization (bitsandbytes,
pytorch-quantization, Gurobi, the inductor-based helpers) are replaced by empty stand-ins, and
the quantizer is the case's fixed rounding (tests/parity_lq_lora_case.py) on both sides.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_lq_lora_case import DECOMPOSITIONS, SHAPES, ilp_case, round_rows, weights  # noqa: E402

COMMIT = "c2424b3adc27197815da1ac9e1304565168d824d"
SRC = Path(os.environ.get("LQ_LORA_SRC", "/tmp/parity/lq_lora/src"))


def reference_module():
    if not (SRC / "models" / "lq_utils.py").is_file():
        sys.exit(f"the reference is absent: extract HanGuo97/lq-lora@{COMMIT[:12]} models/ into {SRC} (docstring)")
    sys.path.insert(0, str(SRC))
    stand_ins = {
        "gurobipy": {},
        "models.misc_utils": {"swarn": lambda *a, **k: None},
        "models.quantization_utils": {"QuantConfig": object, "estimate_storage_from_config": None, "quantize": None},
        "models.quantization_utils_2": {"quantize": None},
    }
    for name, attrs in stand_ins.items():
        sys.modules[name] = types.SimpleNamespace(**attrs)
    lq = importlib.import_module("models.lq_utils")
    lq.maybe_sparsify_or_quantize = lambda A, qconfig, fake=False: round_rows(A)
    return lq


def main() -> None:
    lq = reference_module()
    decompositions = {}
    for name, (rank, cap) in DECOMPOSITIONS.items():
        out = []
        for w in weights():
            l1, l2, q, _ = lq.lowrank_quantized_sparse_decomposition(
                w, num_ranks=rank, num_iterations=cap, randomized=False, qconfig=object()
            )
            out.append({"L1": l1.double().tolist(), "L2": l2.double().tolist(), "Q": q.double().tolist()})
        decompositions[name] = {"rank": rank, "iterations": cap, "matrices": out}
    costs, storage, budgets = ilp_case()
    assignments = [
        np.round(lq.mip_solve(b, costs, storage, backend="scipy").x).reshape(costs.shape).tolist() for b in budgets
    ]
    path = write_fixture(
        "lq_lora",
        {
            "reference": f"HanGuo97/lq-lora@{COMMIT[:12]} models/lq_utils.py "
            "(lowrank_quantized_sparse_decomposition, mip_solve scipy backend)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/lq_lora.py",
            "shapes": SHAPES,
            "cases": {"decompositions": decompositions, "ilp": {"budgets": budgets, "assignments": assignments}},
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
