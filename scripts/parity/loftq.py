"""Pin LoftQ's alternation from peft's ``loftq_init``: writes tests/fixtures/parity/loftq.json.

    .venv/bin/python scripts/parity/loftq.py

Reference: the installed peft's ``peft.utils.loftq_utils.loftq_init`` (LoftQ's authors maintain it
in peft; their repository yxli2123/LoftQ points to it): ``num_iter`` times quantize the residual
W - L R, then L, R = the rank-r SVD split of W - Q (U √S, √S Vh). It quantizes with bitsandbytes'
NF4, which needs CUDA; here ``bitsandbytes`` is a stand-in module whose 4-bit round trip is the
case's fixed rounding (tests/parity_lq_lora_case.py), and the "cuda" device is mapped to the CPU,
so the comparison is of the alternation, as for LQ-LoRA.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_lq_lora_case import SHAPES, round_rows, weights  # noqa: E402

CASES = {"rank2_iter1": (2, 1), "rank4_iter1": (4, 1), "rank4_iter5": (4, 5)}


class FakeParams4bit:
    def __init__(self, data, **_):
        self.data, self.quant_state = data, None

    def to(self, *_args, **_kwargs):
        return self


def stand_in_bitsandbytes() -> types.ModuleType:
    bnb = types.ModuleType("bitsandbytes")
    bnb.nn = types.SimpleNamespace(Params4bit=FakeParams4bit)
    bnb.functional = types.SimpleNamespace(dequantize_4bit=lambda data, state: round_rows(data))
    return bnb


def main() -> None:
    import peft
    from peft.utils import loftq_utils

    sys.modules["bitsandbytes"] = stand_in_bitsandbytes()
    loftq_utils.is_bnb_available = loftq_utils.is_bnb_4bit_available = lambda: True
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)

    torch.Tensor.to = to_cpu
    cases = {}
    for name, (rank, iterations) in CASES.items():
        out = []
        for w in weights():
            q, lora_a, lora_b = loftq_utils.loftq_init(w, num_bits=4, reduced_rank=rank, num_iter=iterations)
            out.append({"Q": q.double().tolist(), "A": lora_a.double().tolist(), "B": lora_b.double().tolist()})
        cases[name] = {"rank": rank, "iterations": iterations, "matrices": out}
    path = write_fixture(
        "loftq",
        {
            "reference": f"peft=={peft.__version__} peft.utils.loftq_utils.loftq_init "
            "(NF4 replaced by the case's rounding)",
            "version": peft.__version__,
            "produced_by": "scripts/parity/loftq.py",
            "shapes": SHAPES,
            "cases": cases,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
