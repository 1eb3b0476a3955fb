"""One optimisation step of any method preset on a tiny random model, for the method matrix and
for method-specific tests. Uses the same ``apply_method`` path as the training loop."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from lorabench.data.base import collate
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.models import load_model
from lorabench.registry import DATASETS
from lorabench.train import resolve_targets
from lorabench.validate import build_run
from tests.conftest import compose, tiny_overrides


@dataclass
class StepResult:
    loss: float
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    trainable: set[str]
    expected_trainable: int | None
    built: object
    ctx: MethodContext
    base_names: dict[str, str]  # name in the wrapped model -> base-model name


def build(method: str, data_dir: Path, tmp: Path, *extra: str, kind: str = "classification", seed: int = 0):
    cfg_dict = compose([f"method={method}", *tiny_overrides(kind, data_dir, tmp), *extra])
    cfg, spec = build_run(cfg_dict)
    torch.manual_seed(seed)
    task = DATASETS.get(cfg.dataset.name)
    splits = task.load(cfg.dataset)
    loaded = load_model(cfg.model, task.head, task.num_labels)
    feats = [task.features(e, loaded.tokenizer, cfg.dataset) for e in splits.train]
    pad = loaded.tokenizer.pad_token_id
    loader = DataLoader(
        feats, batch_size=cfg.hardware.micro_batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad)
    )
    targets = resolve_targets(spec, cfg.model.target_modules, loaded.model)
    ctx = MethodContext(
        targets,
        task.head,
        spec.lr or cfg.train.lr,
        cfg.train.weight_decay,
        cfg.train.max_steps,
        cfg.seed,
        lambda: itertools.islice(iter(loader), 2),
    )
    return cfg, spec, loaded, loader, ctx


def one_step(
    method: str, data_dir: Path, tmp: Path, *extra: str, kind: str = "classification", steps: int = 1
) -> StepResult:
    cfg, spec, loaded, loader, ctx = build(method, data_dir, tmp, *extra, kind=kind)
    base = loaded.model
    base_names = {n: n for n, _ in base.named_parameters()}
    expected = expected_trainable(base, spec, ctx)
    built = apply_method(base, spec, ctx)
    model = built.model
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    loss = None
    for step, batch in zip(range(steps), itertools.cycle(loader)):
        loss = model(**batch).loss
        loss.backward()
        if built.procedure:
            built.procedure.after_backward(step)
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        if built.procedure:
            built.procedure.on_step_end(step + 1)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return StepResult(float(loss), before, after, trainable, expected, built, ctx, base_names)


def changed(result: StepResult, atol: float = 0.0) -> set[str]:
    return {n for n in result.before if not torch.allclose(result.before[n], result.after[n], atol=atol, rtol=0)}


def train_with_procedure(built, batch: dict, steps: int, after_step=None) -> None:
    """``steps`` steps as the training loop runs them: backward, ``procedure.after_backward``,
    optimizer step, ``procedure.on_step_end``; ``after_step(step)`` (if given) runs after each."""
    built.model.train()
    for step in range(steps):
        built.model(**batch).loss.backward()
        built.procedure.after_backward(step)
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        built.procedure.on_step_end(step + 1)
        if after_step is not None:
            after_step(step)


class TwoLinears(nn.Module):
    """Two small seeded linears (24 -> 16 with bias, 24 -> 40 without), outputs concatenated: a tiny model
    whose two targets an adapter wraps."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q, self.v = nn.Linear(24, 16), nn.Linear(24, 40, bias=False)
        with torch.no_grad():
            for lin in (self.q, self.v):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)
            self.q.bias.copy_(torch.randn(16, generator=gen) * 0.1)

    def forward(self, x):
        return torch.cat([self.q(x), self.v(x)], -1)
