"""Pin WeLore's rank selection and low-rank factors from the authors' code: writes
tests/fixtures/parity/welore.json.

    .venv/bin/python scripts/parity/welore.py

Reference: VITA-Group/welore at commit f69f015c360498bc14e8ffaab1bce8c0c8614cde: ``utils.py``'s
``adaptive_rank_pruning`` (min-max normalised singular values below the threshold are pruned) and
``lib/LowRankLayer.py``'s ``LowRankLayer`` (U_k Σ_k^½ and Σ_k^½ V_kᵀ, cast to bf16), with the LRC
rule of ``lib/rank_reduction.py``'s ``do_rank_reduction`` (low rank when pruned / rank > min_ratio).
Obtain it with the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive f69f015c360498bc14e8ffaab1bce8c0c8614cde utils.py lib \
        | tar -x -C /tmp/parity/welore/src

(or point WELORE_SRC at another folder). ``lib/LowRankLayer.py`` and ``utils.py`` are loaded by
path (``lib/__init__`` imports the data loaders, which need the hub).

The case (tests/parity_welore_case.py): four seeded matrices with geometric spectra of different
decay, three thresholds; the singular values come from ``torch.svd`` as in the reference's
``rank_analysis_weight``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_welore_case import MIN_RATIO, SHAPES, THRESHOLDS, weights  # noqa: E402

COMMIT = "f69f015c360498bc14e8ffaab1bce8c0c8614cde"
SRC = Path(os.environ.get("WELORE_SRC", "/tmp/parity/welore/src"))


def load(path: Path, name: str):
    if not path.is_file():
        sys.exit(f"the reference is absent: extract VITA-Group/welore@{COMMIT[:12]} into {SRC} (docstring)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    utils = load(SRC / "utils.py", "welore_reference_utils")
    layer_module = load(SRC / "lib" / "LowRankLayer.py", "welore_reference_layer")
    ws = weights()
    spectra = {0: {f"m{i}": torch.svd(w)[1] for i, w in enumerate(ws)}}
    cases = {}
    for tau in THRESHOLDS:
        args = types.SimpleNamespace(rank_thresold=tau)
        pruned = utils.adaptive_rank_pruning(args, None, spectra, logging.getLogger("welore"))[0]
        matrices = {}
        for i, w in enumerate(ws):
            name, full = f"m{i}", min(w.shape)
            count = int(pruned[name])
            entry = {"pruned": count, "low_rank": bool(count / full > MIN_RATIO)}
            if entry["low_rank"]:
                layer = layer_module.LowRankLayer(full - count, w, True)
                entry["up"] = layer.U.weight.detach().double().tolist()
                entry["down"] = layer.V.weight.detach().double().tolist()
            matrices[name] = entry
        cases[str(tau)] = matrices
        print(f"tau {tau}: pruned {[m['pruned'] for m in matrices.values()]}")
    path = write_fixture(
        "welore",
        {
            "reference": f"VITA-Group/welore@{COMMIT[:12]} utils.py (adaptive_rank_pruning), "
            "lib/LowRankLayer.py (LowRankLayer), lib/rank_reduction.py (the min_ratio rule)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/welore.py",
            "shapes": SHAPES,
            "min_ratio": MIN_RATIO,
            "cases": cases,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
