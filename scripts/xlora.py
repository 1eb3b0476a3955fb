"""The X-LoRA recipe: train K LoRA experts (one per task), then the X-LoRA classifier over them.

    .venv/bin/python scripts/xlora.py                                   # offline: smollm2_135m, 2 experts
    .venv/bin/python scripts/xlora.py --expert gsm8k:dataset.data_dir=../shared/data/gsm8k \\
        --expert e2e:dataset.data_dir=../shared/data/e2e --mix gsm8k:dataset.data_dir=../shared/data/gsm8k
    .venv/bin/python scripts/xlora.py --model tiny_llama --steps 2      # a seconds-long smoke run

Stage 1 runs ``lorabench train method=lora dataset=<task>`` per ``--expert`` (a task name, then
optional comma-separated overrides after a colon); stage 2 runs ``lorabench train method=xlora
method.experts=[...]`` on the ``--mix`` task, training only the X-LoRA classifier. Completed runs are
skipped on a re-run, so the recipe is resumable. X-LoRA in peft supports causal LMs only, so the
experts are generation tasks (GSM8K, E2E, MetaMathQA, or the offline ``gsm_symbolic``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorabench import launch
from lorabench.config_store import compose


def task_overrides(spec: str) -> list[str]:
    name, _, extra = spec.partition(":")
    return [f"dataset={name}", *(o for o in extra.split(",") if o)]


def run(overrides: list[str]) -> dict:
    code = launch.run_one(compose(overrides), "python scripts/xlora.py " + " ".join(overrides), multirun=True)
    if code:
        raise SystemExit(f"run failed (exit {code}): {' '.join(overrides)}")
    return launch.SWEEP_SUMMARY[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--expert", action="append", help="TASK[:override,...] (repeatable; default: 2 offline)")
    parser.add_argument("--mix", default="gsm_symbolic", help="TASK[:override,...] the X-LoRA classifier trains on")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--results-dir", default="results/runs/xlora")
    args = parser.parse_args()
    experts = args.expert or ["gsm_symbolic:dataset.subset_seed=0", "gsm_symbolic:dataset.subset_seed=1"]
    common = [
        f"model={args.model}",
        "train=quickstart",
        f"train.max_steps={args.steps}",
        "progress=false",
        f"results_dir={args.results_dir}",
    ]
    expert_dirs = []
    for spec in experts:
        summary = run(["method=lora", *task_overrides(spec), *common])
        expert_dirs.append(str(Path(args.results_dir) / summary["run"]))
        print(f"[xlora] expert {spec}: {expert_dirs[-1]}")
    run(["method=xlora", f"method.experts=[{','.join(expert_dirs)}]", *task_overrides(args.mix), *common])
    print(f"[xlora] done; compare with: lorabench table --results-dir {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
