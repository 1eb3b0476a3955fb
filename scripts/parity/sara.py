"""Pin SaRA from the authors' code: writes tests/fixtures/parity/sara.json.

    .venv/bin/python scripts/parity/sara.py

Reference: sjtuplayer/SaRA at commit ea21192477eb07f11f0fa202108e8c07873d91b9, the two optimizers that are
the whole method (the rest of the repository is the Stable Diffusion training and evaluation around them):
  * optim/adamw.py, ``AdamW`` with the autograd Function ``Sparse`` (the default "unstructural backprop"
    path of examples/finetune.py): the selected entries |w| < threshold become separate leaf tensors, the
    model's weights are rebuilt from them after every step, the progressive re-selection builds a new
    optimizer at step progressive_iter + 1 and returns without an update;
  * optim/adamw2.py, ``AdamW`` (``--disable_ub``): dense parameters, the unselected entries put back after
    every step, the re-selection intersects the new mask with the old one and the step goes on.
Both take lr = 1e-3 exp(-350 threshold) when no lr is given (examples/finetune.py gives none), and add
lambda_rank * ||param * mask||_* of one layer drawn with random.choice among the 2-D tensors whose smaller
side exceeds 64 (adamw2.py: only if the mask holds more than 100 entries), inside step().
Obtain the code with the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive ea21192477eb07f11f0fa202108e8c07873d91b9 optim | tar -x -C /work/scratch/sara/ref

(or point SARA_SRC at another folder holding optim/). The files are loaded by path; only torch is needed.

The case (tests/test_parity_sara.py: ``TwoLinear``, ``case_data``): two bias-free linears 72 -> 80 -> 72 with
a tanh between (both sides > 64, so both can be drawn), weights N(0, 0.02^2) (threshold 2e-3 selects ~8%),
12 steps of the loss sum(h * g_t) on seeded inputs x_t and upstream gradients g_t, weight decay 1e-2 (the
script's default), the authors' lr, re-selection after step 6, random.seed(0) before the first step. Cases:
  * dense_preset: adamw2.py as released, lambda_rank 5e-4 (finetune.sh);
  * dense_rank: adamw2.py, lambda_rank 5e-2 (the nuclear-norm gradient made large enough to matter);
  * ub: adamw.py with ``trainable_params[i].abs()`` replaced by ``trainable_params[i]`` in its two
    ``Sparse.apply`` calls (as released it writes |value| into W for the forward after each selection),
    lambda_rank 0 (its nuclear-norm gradient never reaches the trained tensors: ``ub_rank_term_effect``).
Recorded per step: the output, float64 sums (plain, absolute, squared) of the task gradient of the
selected entries (zero where the step's mask excludes them; None at a step that makes no update; the
gradient itself at the first step, in the order of the first selection), a float64 checksum of each
weight after the step, the layer drawn; then the masks, the final values on the first
selection and the largest change off it. Besides: ``ub_rank_term_effect`` (largest weight difference
between adamw.py at lambda 0 and 5e-2) and ``ub_abs_effect`` (adamw.py as released against the patched one).
"""

from __future__ import annotations

import math
import os
import random
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_one_linear import plain  # noqa: E402
from tests.test_parity_sara import SHAPE, TwoLinear, case_data, dense_on  # noqa: E402

COMMIT = "ea21192477eb07f11f0fa202108e8c07873d91b9"
SRC = Path(os.environ.get("SARA_SRC", "/work/scratch/sara/ref"))
ABS = "trainable_params[i].abs()"


def load(name: str, patch_abs: bool = False) -> types.ModuleType:
    path = SRC / "optim" / f"{name}.py"
    if not path.is_file():
        sys.exit(f"the reference is absent: extract sjtuplayer/SaRA@{COMMIT[:12]} optim/ into {SRC}")
    text = path.read_text()
    if patch_abs:
        assert text.count(ABS) == 2, "the two Sparse.apply(..., trainable_params[i].abs(), ...) calls moved"
        text = text.replace(ABS, "trainable_params[i]")
    module = types.ModuleType(f"sara_reference_{name}{'_noabs' if patch_abs else ''}")
    module.__file__ = str(path)
    exec(compile(text, str(path), "exec"), module.__dict__)
    return module


class Draws:
    """Python's global random, recording the index of every random.choice (the drawn layer)."""

    def __init__(self):
        self.seen: list[int] = []

    def choice(self, seq):
        picked = random.choice(seq)
        self.seen.append(picked)
        return picked


def run_reference(module, case: dict) -> dict:
    model = TwoLinear(SHAPE["d_in"], SHAPE["d_hidden"], case["weight_seed"])
    w0 = [model.up.weight.detach().clone(), model.down.weight.detach().clone()]
    ub = case["optimizer"] == "adamw"
    draws = Draws()
    module.random = draws  # the module's ``random.choice`` now records
    random.seed(case["seed"])
    opt = module.AdamW(
        model if ub else model.parameters(),
        threshold=case["threshold"],
        progressive_iter=case["progressive_iter"],
        lambda_rank=case["lambda_rank"],
        weight_decay=case["weight_decay"],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    lr = opt.param_groups[0]["lr"]
    assert math.isclose(lr, 1e-3 * math.exp(-350 * case["threshold"]), rel_tol=1e-12)
    first = [m.clone() for m in opt.param_mask_groups]
    index0 = [torch.nonzero(m.flatten()).flatten() for m in first]
    weights = lambda: [model.up.weight, model.down.weight]  # noqa: E731  (adamw.py swaps the tensors)
    outputs, grads, trajectory, drawn = [], [], [], []
    for x, g in case_data(case):
        h = model(x)
        (h * g).sum().backward()
        if ub:  # the leaf tensors of the current selection: their gradients, on that selection's mask
            masks = (
                opt.param_mask_groups if opt.inner_iter <= case["progressive_iter"] else opt.param_mask_groups_adaptive
            )
            raw = [dense_on(mask, p.grad) for mask, p in zip(masks, opt.param_groups[0]["params"])]
        else:
            raw = [w.grad.detach().clone() for w in weights()]
        n_draws = len(draws.seen)
        opt.step()
        opt.zero_grad()
        outputs.append(plain(h))
        if ub and opt.inner_iter == case["progressive_iter"] + 1:
            grads.append(None)  # the re-selection step: a new optimizer, no update
        else:
            if opt.inner_iter <= case["progressive_iter"]:
                used = opt.param_mask_groups
            else:
                used = opt.param_mask_groups_adaptive
            grads.append([(r * m).flatten()[i] for r, m, i in zip(raw, used, index0)])
        trajectory.append(
            [[w.detach().double().sum().item(), w.detach().double().abs().sum().item()] for w in weights()]
        )
        drawn.append(draws.seen[n_draws] if len(draws.seen) > n_draws else None)
    final = [w.detach().clone() for w in weights()]
    adaptive = opt.param_mask_groups_adaptive
    return {
        "lr": lr,
        "index0": [i.tolist() for i in index0],
        "active_after": [torch.nonzero(m.flatten()).flatten().tolist() for m in adaptive],
        "outputs": outputs,
        "grads0": [plain(v) for v in grads[0]],
        "grad_sums": [None if gs is None else [grad_sums(v) for v in gs] for gs in grads],
        "trajectory": trajectory,
        "drawn": drawn,
        "final_values": [plain(w.flatten()[i]) for w, i in zip(final, index0)],
        "off_selection_change": max(
            (w - w_0).flatten()[~m.flatten()].abs().max().item() for w, w_0, m in zip(final, w0, first)
        ),
        "final_weights": final,  # dropped before writing
    }


def grad_sums(v: torch.Tensor) -> list[float]:
    """sum, sum of |.|, sum of squares (float64) of one layer's gradient on the first selection."""
    v = v.detach().double()
    return [v.sum().item(), v.abs().sum().item(), (v * v).sum().item()]


def cases() -> dict:
    common = {**SHAPE, "threshold": 2e-3, "progressive_iter": 6, "weight_decay": 1e-2, "seed": 0}
    ours = {"sara_threshold": 2e-3, "sara_progressive_step": 6}
    return {
        "dense_preset": {
            **common,
            "optimizer": "adamw2",
            "lambda_rank": 5e-4,
            "ours": {**ours, "sara_lambda_rank": 5e-4, "sara_reselect": "continue"},
        },
        "dense_rank": {
            **common,
            "optimizer": "adamw2",
            "lambda_rank": 5e-2,
            "ours": {**ours, "sara_lambda_rank": 5e-2, "sara_reselect": "continue"},
        },
        "ub": {
            **common,
            "optimizer": "adamw",
            "lambda_rank": 0.0,
            "ours": {**ours, "sara_lambda_rank": 0.0, "sara_reselect": "restart"},
        },
    }


def largest_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    modules = {"adamw2": load("adamw2"), "adamw": load("adamw", patch_abs=True)}
    out = {}
    for name, case in cases().items():
        ref = run_reference(modules[case["optimizer"]], case)
        ref.pop("final_weights")
        out[name] = {**case, **ref}
        kept = [len(a) for a in ref["active_after"]]
        print(f"{name}: lr {ref['lr']:.6g}, selected {[len(i) for i in ref['index0']]}, kept {kept}")
    ub = cases()["ub"]
    silent = run_reference(load("adamw", patch_abs=True), {**ub, "lambda_rank": 5e-2})["final_weights"]
    plain_ub = run_reference(load("adamw", patch_abs=True), ub)["final_weights"]
    released = run_reference(load("adamw"), ub)["final_weights"]
    rank_effect, abs_effect = largest_gap(silent, plain_ub), largest_gap(released, plain_ub)
    print(f"adamw.py: lambda 0 vs 5e-2 differ by {rank_effect:g}; as released vs without .abs(): {abs_effect:g}")
    path = write_fixture(
        "sara",
        {
            "reference": f"sjtuplayer/SaRA@{COMMIT[:12]} (optim/adamw.py AdamW + Sparse; optim/adamw2.py AdamW)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/sara.py",
            "cases": out,
            "ub_rank_term_effect": rank_effect,
            "ub_abs_effect": abs_effect,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
