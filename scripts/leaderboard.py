"""Track A of the shipped leaderboard: every CPU-capable method on one fixed SST-2 benchmark.

    .venv/bin/python scripts/leaderboard.py --seeds 0 1 2            # or: make leaderboard
    .venv/bin/python scripts/leaderboard.py --methods lora full --seeds 0 --results-dir /tmp/lb

Protocol (fixed): minilm_l6 (all-MiniLM-L6-v2), GLUE SST-2, a fixed 4,000-sentence training subset
(subset seed 0), 250 steps of global batch 16 (one epoch), max length 128, linear schedule with 6%
warmup, evaluated once at the end on the full dev set (872). Each method runs at its preset's
paper-default setting; the learning rate is per method family (LR below) until the per-method
learning-rate sweep replaces it. Data: ``--data-dir`` (official GLUE TSV folder), else
``../shared/data/glue/SST-2`` when present, else the hub. Runs whose completed record exists are
skipped, so the command is resumable; failures are listed at the end and do not stop the others.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lorabench.cli import CONF_DIR, run_one
from lorabench.config_store import compose
from lorabench.methods.catalog import load_presets

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = [
    "model=minilm_l6",
    "dataset=sst2",
    "dataset.train_size=4000",
    "dataset.max_length=128",
    "train=default",
    "train.max_steps=250",
    "train.global_batch_size=16",
    "train.eval_every=0",
    "train.warmup_ratio=0.06",
    "hardware=cpu",
    "hardware.micro_batch_size=16",
    "progress=false",
]
# learning rate per method; methods not listed use DEFAULT_LR (LoRA-family adapters)
DEFAULT_LR = 5e-4
LR = {
    "full": 5e-5,
    "lisa": 5e-5,
    "badam": 5e-5,  # full-weight AdamW
    "galore": 1e-4,
    "galore_torch": 1e-4,
    "fira": 1e-4,
    "frugal": 1e-4,
    "q_galore": 1e-4,
    "dct_adamw": 1e-4,
    "vera": 5e-3,
    "nola": 5e-3,
    "lora_xs": 5e-3,
    "lora_sb": 5e-3,
    "inttune": 5e-3,
    "svfit": 5e-3,
    "loldu": 5e-3,
    "flora": 5e-3,
    "salt": 1e-3,  # few trainable parameters: the papers use larger learning rates
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="presets to run (default: every CPU-capable preset)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results-dir", default=str(ROOT / "results" / "leaderboard" / "records"))
    args = parser.parse_args()
    presets = load_presets(CONF_DIR / "method")
    methods = args.methods or sorted(m for m, raw in presets.items() if not raw.get("requires_cuda"))
    shared = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
    data_dir = args.data_dir or (str(shared) if shared.is_dir() else None)
    data = [f"dataset.data_dir={data_dir}"] if data_dir else []
    failures, start = [], time.perf_counter()
    for seed in args.seeds:
        for method in methods:
            overrides = [
                f"method={method}",
                *PROTOCOL,
                *data,
                f"train.lr={LR.get(method, DEFAULT_LR)}",
                f"seed={seed}",
                f"results_dir={args.results_dir}",
            ]
            command = "python scripts/leaderboard.py " + " ".join(overrides)
            code = run_one(compose(overrides), command, multirun=True)
            if code:
                failures.append(f"{method} seed {seed} (exit {code})")
    print(
        f"[leaderboard] {len(methods) * len(args.seeds)} runs in {time.perf_counter() - start:.0f}s; "
        f"failures: {failures or 'none'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
