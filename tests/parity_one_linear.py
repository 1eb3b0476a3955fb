"""The fixed problem the DyLoRA, Hydra and LoRA-SB parity checks share (scripts/parity/{dylora,
hydra_lora,lora_sb}.py and tests/test_parity_{dylora,hydra_lora,lora_sb}.py).

One pretrained ``nn.Linear`` (d_in -> d_out, with bias; seeded Gaussian weight and bias) held as
``OneLinear.lin``. Every step draws a seeded input x_t (batch x d_in) and a seeded upstream gradient
g_t (batch x d_out) from one CPU generator and backpropagates the loss L = sum(h_t * g_t), so
dL/dh_t = g_t on both sides while each side's own layer computes h_t and the gradients of its own
tensors. ``run`` records per step the output h_t, the gradient of every trainable tensor and a float64
checksum of those tensors after the optimizer step, and at the end the tensors themselves, under
names shared by both sides (a script maps the reference's attribute names onto them). Called with
``input_ids`` (the inputs, under the name the LoRA-SB reference's gradient loop reads) and ``labels``
(the upstream gradients) the model returns that loss as ``.loss``, for gradient-driven inits;
``calibration`` gives such batches.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) * 0.3)
            self.lin.bias.copy_(torch.randn(d_out, generator=gen) * 0.1)

    @property
    def device(self) -> torch.device:
        return self.lin.weight.device

    def forward(self, x=None, input_ids=None, labels=None):
        h = self.lin(x if x is not None else input_ids)
        return h if labels is None else SimpleNamespace(loss=(h * labels).sum(), logits=h)


def calibration(case: dict) -> list[dict[str, torch.Tensor]]:
    """``case["calib_batches"]`` batches of ``case["calib_batch"]`` seeded (input_ids, labels) pairs."""
    gen = torch.Generator().manual_seed(case["calib_seed"])
    n = case["calib_batch"]
    return [
        {
            "input_ids": torch.randn(n, case["d_in"], generator=gen),
            "labels": torch.randn(n, case["d_out"], generator=gen),
        }
        for _ in range(case["calib_batches"])
    ]


def data(case: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, g_t) pairs of every step, from one generator seeded with ``case["data_seed"]``."""
    gen = torch.Generator().manual_seed(case["data_seed"])
    shape_x, shape_g = (case["batch"], case["d_in"]), (case["batch"], case["d_out"])
    return [(torch.randn(shape_x, generator=gen), torch.randn(shape_g, generator=gen)) for _ in range(case["steps"])]


def plain(t: torch.Tensor):
    """A tensor as nested lists of its float32 values written with 9 significant digits (exact for fp32)."""

    def fmt(v):
        return [fmt(u) for u in v] if isinstance(v, list) else float(f"{v:.9g}")

    return fmt(t.detach().float().tolist())


def run(
    forward: Callable[[torch.Tensor], torch.Tensor],
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    case: dict,
    before_forward: Callable[[int], None] | None = None,
    after_backward: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict:
    """``case["steps"]`` steps of forward, backward of sum(h * g), optimizer step; what both sides pin."""
    outputs, grads, trajectory = [], [], []
    for t, (x, g) in enumerate(data(case)):
        if before_forward is not None:
            before_forward(t)
        h = forward(x)
        (h * g).sum().backward()
        if after_backward is not None:
            after_backward(t)
        outputs.append(plain(h))
        grads.append({n: plain(p.grad) for n, p in tensors.items() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(t)
        values = [p.detach().double() for p in tensors.values()]
        trajectory.append([sum(v.sum().item() for v in values), sum(v.abs().sum().item() for v in values)])
    return {
        "outputs": outputs,
        "grads": grads,
        "trajectory": trajectory,
        "final": {n: plain(p) for n, p in tensors.items()},
    }


def build_ours(method: str, case: dict, overrides: dict | None = None, calibration=None):
    """Our preset ``method`` (with ``case["ours"]`` and ``overrides``) applied to the case's layer.
    (lorabench is imported here only: the reference scripts import this module beside their own pins.)"""
    from lorabench.methods.base import MethodContext
    from lorabench.methods.build import apply_method
    from lorabench.methods.catalog import load_presets
    from lorabench.methods.spec import resolve_method
    from tests.conftest import CONF_DIR

    model = OneLinear(case["d_in"], case["d_out"], case["weight_seed"])
    spec = resolve_method({**load_presets(CONF_DIR / "method")[method], **case["ours"], **(overrides or {})})
    ctx = MethodContext(
        ["lin"],
        "causal_lm",
        lr=case["lr"],
        weight_decay=case["weight_decay"],
        max_steps=case.get("max_steps", case["steps"]),
        seed=0,
        calibration_batches=calibration or (lambda: iter(())),
    )
    return apply_method(model, spec, ctx), spec, ctx


def gap(a, b) -> float:
    """max |a - b| / max(1, max |b|): each tensor on its own scale (fp32 carries ~7 digits)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def worst_gap(ours: dict, ref: dict) -> dict[str, float]:
    """The largest ``gap`` of the outputs, the gradients (every step) and the final tensors, and the
    largest absolute difference of the per-step checksums."""
    assert len(ours["outputs"]) == len(ref["outputs"]), "step counts differ"
    assert [sorted(g) for g in ours["grads"]] == [sorted(g) for g in ref["grads"]], "gradient sets differ"
    return {
        "outputs": max(gap(a, b) for a, b in zip(ours["outputs"], ref["outputs"])),
        "grads": max(gap(a[n], b[n]) for a, b in zip(ours["grads"], ref["grads"]) for n in b),
        "final": max(gap(ours["final"][n], ref["final"][n]) for n in ref["final"]),
        "trajectory": max(abs(a - b) for o, r in zip(ours["trajectory"], ref["trajectory"]) for a, b in zip(o, r)),
    }
