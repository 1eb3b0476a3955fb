"""The ``adalora`` procedure's rules: peft's allocator gets the 1-based number of the optimizer step,
the effective ranks are keyed by the base model's module names, and a checkpoint restores the call
count and the rank pattern (peft's config included)."""

from __future__ import annotations

import copy
import json

from lorabench.methods.base import target_linear_weights
from lorabench.methods.build import apply_method
from lorabench.methods.procedures.adalora import AdaLoraAllocator
from tests.method_harness import build, train_with_procedure

SCHEDULE = ("train.max_steps=6", "method.init_r=6", "method.target_r=2", "method.tinit=1", "method.tfinal=1")


def adalora(sst2_dir, tmp_path):
    _, spec, loaded, loader, ctx = build("adalora", sst2_dir, tmp_path, *SCHEDULE)
    names = {n.removesuffix(".weight") for n, _ in target_linear_weights(loaded.model, ctx.target_modules)}
    return apply_method(loaded.model, spec, ctx), next(iter(loader)), names


class RecordingTuner:
    def __init__(self):
        self.steps = []

    def update_and_allocate(self, global_step):
        self.steps.append(global_step)


def test_allocator_gets_the_one_based_optimizer_step():
    proc = AdaLoraAllocator()
    proc.tuner, proc.calls = RecordingTuner(), 0
    for step in range(4):
        proc.after_backward(step)
    assert proc.tuner.steps == [1, 2, 3, 4] and proc.calls == 4


def test_ranks_are_keyed_by_the_base_models_module_names(sst2_dir, tmp_path):
    built, batch, names = adalora(sst2_dir, tmp_path)
    train_with_procedure(built, batch, 6)
    ranks = built.procedure.state()["adalora_ranks"]
    assert set(ranks) == names and sum(ranks.values()) == 2 * len(names)  # the target budget


def test_checkpoint_restores_calls_and_rank_pattern(sst2_dir, tmp_path):
    built, batch, _ = adalora(sst2_dir, tmp_path)
    train_with_procedure(built, batch, 6)
    saved = json.loads(json.dumps(built.procedure.state_dict()))
    assert saved["calls"] == 6 and saved["rank_pattern"]
    fresh, _, _ = adalora(sst2_dir, tmp_path)
    fresh.procedure.load_state_dict(copy.deepcopy(saved))
    assert fresh.procedure.state()["adalora_allocator_calls"] == 6
    assert fresh.procedure.state_dict() == saved  # the pattern is peft's config again
    tuner = fresh.model.base_model
    assert tuner.peft_config[tuner.trainable_adapter_name].rank_pattern == saved["rank_pattern"]


def test_a_checkpoint_without_calls_restarts_the_count(sst2_dir, tmp_path):
    built, _, _ = adalora(sst2_dir, tmp_path)
    built.procedure.calls = 5
    built.procedure.load_state_dict({"rank_pattern": {}})
    assert built.procedure.state()["adalora_allocator_calls"] == 0
