"""Pin EoRA's compensation from the authors' code: writes tests/fixtures/parity/eora.json.

    .venv/bin/python scripts/parity/eora.py

Reference: NVlabs/EoRA at commit 11ff6c0e1c90862945c9fd524c07637be2fbbb12, ``EoRA/eora.py``'s
``llama_sequential_eigen`` (the second moments' running update over calibration sequences, eigh in
float64 with negative eigenvalues replaced, ΔW Q Λ^½ truncated by SVD, B = U_r Σ_r^½ and
A = Σ_r^½ V_rᵀ Λ^{-½} Qᵀ) and ``llama_sequential_svd`` (the plain SVD compensation). Obtain it with
the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive 11ff6c0e1c90862945c9fd524c07637be2fbbb12 EoRA | tar -x -C /tmp/parity/eora/src

(or point EORA_SRC at another folder holding ``EoRA/eora.py``). The script runs on CPU: the
reference moves the moments to "cuda" for the eigh, which is mapped to the CPU here, and its
``evaluate_utils`` (lm-eval) is replaced by an empty module, as nothing here evaluates.

The case (tests/parity_eora_case.py): a one-block model with Llama's seven projection names, a
fixed rounding of every projection as the compressed weight, 6 calibration sequences of 20
tokens, rank 4. The fixture keeps each projection's B and A from both functions.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_eora_case import RANK, SEQUENCES, build  # noqa: E402

COMMIT = "11ff6c0e1c90862945c9fd524c07637be2fbbb12"
SRC = Path(os.environ.get("EORA_SRC", "/tmp/parity/eora/src")) / "EoRA"


def reference_module():
    if not (SRC / "eora.py").is_file():
        sys.exit(
            f"the reference is absent: extract NVlabs/EoRA@{COMMIT[:12]} EoRA/ into {SRC.parent} (see the docstring)"
        )
    sys.path.insert(0, str(SRC))
    sys.modules["evaluate_utils"] = types.SimpleNamespace(evaluate_model=None)  # lm-eval: not used here
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):  # the reference's eigh runs on "cuda"
        return to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)

    torch.Tensor.to = to_cpu
    import eora  # noqa: PLC0415  (the reference, from SRC)

    eora.args = types.SimpleNamespace(eigen_nsamples=SEQUENCES, eigen_r=RANK)
    return eora


def factors(lowrank: dict) -> dict:
    out = {}
    for key, value in lowrank.items():
        name = key.removeprefix("base_model.model.model.layers.0.").removesuffix(".weight")
        module, factor = name.rsplit(".", 1)  # e.g. self_attn.q_proj, lora_A
        out.setdefault(module, {})[factor[-1]] = value.double().tolist()
    return out


def main() -> None:
    eora = reference_module()
    cases = {}
    for name, fn in (("eora", eora.llama_sequential_eigen), ("svd", None)):
        model, ids, compressed = build()
        dataloader = [(ids[j : j + 1],) for j in range(SEQUENCES)]
        with torch.no_grad():
            if fn is None:
                lowrank = eora.llama_sequential_svd(
                    model, {k: v.clone() for k, v in compressed.items()}, torch.device("cpu")
                )
            else:
                lowrank = fn(model, dataloader, {k: v.clone() for k, v in compressed.items()}, torch.device("cpu"))
        cases[name] = {"factors": factors(lowrank)}
        print(f"{name}: {len(cases[name]['factors'])} projections")
    path = write_fixture(
        "eora",
        {
            "reference": f"NVlabs/EoRA@{COMMIT[:12]} EoRA/eora.py (llama_sequential_eigen, llama_sequential_svd)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/eora.py",
            "rank": RANK,
            "sequences": SEQUENCES,
            "cases": cases,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
