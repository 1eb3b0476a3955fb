"""Time one optimizer step of lorabench's `galore` against the authors' `galore-torch`.

    .venv/bin/python scripts/bench_galore_step.py --model smollm2_135m --rank 8 --steps 6

Both optimizers get the same model, rank, targets (every linear layer but the head) and the same
fixed random gradients. The projector-refresh step (step 0, an SVD per matrix) is reported
separately from the median of the ordinary steps; the ratio is ours / galore-torch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lorabench.methods  # noqa: F401  registers the optimizers
from lorabench.config import ModelConfig
from lorabench.methods.base import MethodContext, target_linear_weights
from lorabench.models import load_model
from lorabench.registry import OPTIMIZERS

MODELS = {
    "smollm2_135m": ModelConfig(name="smollm2_135m", offline="smollm2_gguf", source="offline", architecture="decoder"),
    "tiny_llama": ModelConfig(name="tiny_llama", random_init="tiny_llama", source="random", architecture="decoder"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def time_steps(name: str, model: torch.nn.Module, grads: list[dict], rank: int) -> tuple[float, list[float]]:
    builder = OPTIMIZERS.get(name)()
    params = builder.Params(rank=rank, update_proj_gap=1000)
    ctx = MethodContext(TARGETS, "causal_lm", 1e-5, 0.0, len(grads), 0)
    optimizer = builder.build(model, params, ctx)
    times = []
    for g in grads:
        for n, p in model.named_parameters():
            p.grad = g[n]
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", choices=sorted(MODELS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    base = load_model(MODELS[args.model], "causal_lm").model
    torch.manual_seed(0)
    grads = [{n: torch.randn_like(p) * 1e-3 for n, p in base.named_parameters()} for _ in range(args.steps)]
    print(
        f"{args.model}: {len(target_linear_weights(base, TARGETS))} projected matrices, rank {args.rank}, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    for name in ("galore_torch", "galore", "galore_torch", "galore"):  # interleaved, second round reported
        model = load_model(MODELS[args.model], "causal_lm").model
        results[name] = time_steps(name, model, grads, args.rank)
    for name, (refresh, steps) in results.items():
        print(
            f"{name:>13}: refresh step {refresh * 1e3:8.1f} ms; median ordinary step "
            f"{statistics.median(steps) * 1e3:8.1f} ms over {len(steps)}"
        )
    ours, ref = results["galore"], results["galore_torch"]
    print(
        f"ratio ours/galore-torch: refresh {ours[0] / ref[0]:.2f}, ordinary "
        f"{statistics.median(ours[1]) / statistics.median(ref[1]):.2f}"
    )


if __name__ == "__main__":
    main()
