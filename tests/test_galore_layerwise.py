"""GaLore's per-layer weight updates (paper §4.3): the same trajectory as the standard step, every
gradient freed inside the backward pass, resumable, and refused where it cannot hold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.methods.optimizers.galore_family import GaLoreFamily
from lorabench.validate import validate_config


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 12), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12), nn.LayerNorm(12))


def _optimizer(model: nn.Module) -> GaLoreFamily:
    linear = [model[1].weight, model[3].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in linear)]
    groups = [
        {"params": rest, "weight_decay": 0.0},
        {"params": linear, "projector": "svd", "rank": 3, "update_proj_gap": 4, "scale": 0.5, "weight_decay": 0.1},
    ]
    return GaLoreFamily(groups, lr=1e-2)


def _loss(model, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 11, (5, 7), generator=g)
    return model(tokens).pow(2).mean()


def _train(model, optimizer, steps, start=0, layerwise=False):
    for step in range(start, start + steps):
        _loss(model, step).backward()
        if layerwise:
            assert all(p.grad is None for p in model.parameters())  # used and freed in the backward pass
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_layerwise_updates_follow_the_standard_trajectory_exactly_and_resume():
    standard, layerwise = _model(), _model()
    opt_standard, opt_layerwise = _optimizer(standard), _optimizer(layerwise)
    opt_layerwise.enable_layerwise()
    _train(standard, opt_standard, 9)  # two projector refreshes (gap 4)
    _train(layerwise, opt_layerwise, 9, layerwise=True)
    for a, b in zip(standard.parameters(), layerwise.parameters()):
        assert torch.equal(a, b)
    moved = sum((a - b).abs().sum() for a, b in zip(standard.parameters(), _model().parameters()))
    assert moved > 0.1  # the trajectory is not trivially the initial point

    resumed = _model()
    resumed.load_state_dict(layerwise.state_dict())
    opt_resumed = _optimizer(resumed)
    opt_resumed.enable_layerwise()
    opt_resumed.load_state_dict(copy.deepcopy(opt_layerwise.state_dict()))
    _train(layerwise, opt_layerwise, 4, start=9, layerwise=True)
    _train(resumed, opt_resumed, 4, start=9, layerwise=True)
    for a, b in zip(layerwise.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "train.max_grad_norm must be null"),
        (["train.max_grad_norm=null", "hardware.micro_batch_size=1"], "gradient accumulation must be 1"),
        (["train.max_grad_norm=null", "train.nonfinite=skip"], "train.nonfinite must be stop"),
        (
            ["train.max_grad_norm=null", "method=galore_torch"],
            "unknown key.s. method.layerwise for method 'galore_torch'",
        ),
    ],
)
def test_layerwise_refuses_what_needs_every_gradient_first(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(
            compose(
                [
                    "method=galore",
                    *[e for e in extra if e.startswith("method=")],
                    "+method.layerwise=true",
                    *[e for e in extra if not e.startswith("method=")],
                ]
            )
        )


def test_layerwise_galore_trains_in_the_loop(tmp_path, gsm8k_dir):
    import json

    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    code = train(
        "method=galore",
        *tiny_overrides("causal_lm", gsm8k_dir, tmp_path),
        "+method.layerwise=true",
        "train.max_grad_norm=null",
        "hardware.micro_batch_size=4",
    )
    assert code == 0
    record = json.loads((only_run_dir(tmp_path) / "record.json").read_text())
    assert record["status"] == "completed" and "'layerwise': True" in str(record["method"])
    assert record["cost"]["optimizer_state_bytes"] > 0


def test_the_makefile_quickstart_is_a_valid_low_memory_run():
    """``make quickstart`` runs ``lorabench train $(QUICKSTART)``: it must pass validation, and be
    the layerwise, low-memory form of ``method=galore`` that the README measures."""
    from pathlib import Path

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    (line,) = [ln for ln in makefile.splitlines() if ln.startswith("QUICKSTART ?=")]
    overrides = line.split("?=", 1)[1].split()
    cfg = compose(overrides)
    validate_config(cfg)
    assert cfg["method"]["label"] == "galore" and cfg["method"]["layerwise"] is True
    assert cfg["hardware"]["name"] == "cpu_lowmem" and cfg["train"]["max_grad_norm"] is None
    with pytest.raises(ConfigError, match="train.max_grad_norm must be null"):
        validate_config(compose([o for o in overrides if not o.startswith("train.max_grad_norm")]))


def test_layerwise_refuses_a_regularizer():
    with pytest.raises(ConfigError, match="method.regularizer must be none"):
        validate_config(
            compose(
                [
                    "method=galore",
                    "+method.layerwise=true",
                    "train.max_grad_norm=null",
                    "+method.regularizer=gradient_norm_penalty",
                ]
            )
        )
