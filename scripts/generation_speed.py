"""Evaluation's generation speed on SmolLM2-135M: GSM greedy (stop strings), E2E greedy and E2E beam.

    python scripts/generation_speed.py [--examples 32] [--e2e-dir ../shared/data/e2e] [--out FILE.json]

Each case runs the dataset's own ``predict`` (what a run's evaluation calls: batching, left padding,
KV cache, stop strings, beam settings) on the first ``--examples`` evaluation examples of the base
model and reports wall time, examples/s and generated tokens/s (the predictions re-tokenized). It
measures whatever ``lorabench`` is importable, so a before/after comparison runs this file twice with
``PYTHONPATH`` at two checkouts, in one session, alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cases(e2e_dir: str | None) -> dict[str, list[str]]:
    out = {"gsm_symbolic greedy": ["dataset=gsm_symbolic"]}
    if e2e_dir:
        e2e = ["dataset=e2e", f"dataset.data_dir={e2e_dir}"]
        out["e2e greedy"] = [*e2e, "dataset.num_beams=1"]
        out["e2e beam 10"] = e2e
    return out


def measure(overrides: list[str], examples: int) -> dict:
    import torch

    from lorabench.config_store import compose
    from lorabench.models import load_model
    from lorabench.registry import DATASETS
    from lorabench.validate import build_run

    cfg, _ = build_run(compose(["model=smollm2_135m", "method=lora", *overrides]))
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    splits = task.load(cfg.dataset)
    loaded = load_model(cfg.model, task.head, task.num_labels)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    chosen = splits.eval[:examples]
    start = time.perf_counter()
    with torch.no_grad():
        predictions = task.predict(model, tokenizer, chosen, cfg.dataset, "cpu")
    seconds = time.perf_counter() - start
    texts = [p if isinstance(p, str) else json.dumps(p) for p in predictions]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {
        "examples": len(chosen),
        "seconds": seconds,
        "examples_per_s": len(chosen) / seconds,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "eval_batch_size": cfg.dataset.eval_batch_size,
        "num_beams": cfg.dataset.num_beams,
        "max_new_tokens": cfg.dataset.max_new_tokens,
        "threads": torch.get_num_threads(),
        "predictions": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--e2e-dir", default=None, help="a folder with the E2E csv files (devset.csv)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    from lorabench.console import quiet_libraries

    quiet_libraries()
    results = {}
    for name, overrides in cases(args.e2e_dir).items():
        results[name] = measure(overrides, args.examples)
        r = results[name]
        print(f"{name}: {r['seconds']:.1f} s, {r['examples_per_s']:.2f} examples/s, {r['tokens_per_s']:.1f} tokens/s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
