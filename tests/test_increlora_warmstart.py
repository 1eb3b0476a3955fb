"""IncreLoRA's advance learning (warm-started reserved components) and the restarted warm-up of new
components, as in the authors' code (FeiyuZhang98/IncreLoRA: loralib/loralib/increlora.py and
NLU/src/transformers/optimization.py ``Multi_LambdaLR``), on the tiny BERT."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import get_scheduler

from lorabench.methods.adapters.layer import adapter_layers
from lorabench.methods.base import head_parameter_count, target_linear_weights
from lorabench.methods.build import apply_method
from tests.method_harness import build

GATE = 1e-5  # the authors' frozen lambda of a reserved component (add_reserve_param)
GATE32 = float(torch.tensor(GATE, dtype=torch.float32))  # as stored in the float32 lambda


def authors_lr(base: float, add_step: int, step: int, warmup: int, total: int) -> float:
    """The learning rate the authors' ``Multi_LambdaLR`` gives, at optimizer step ``step``, to a param
    group added before ``optimizer.step()`` of ``add_step``: no update at ``add_step`` (the tensors had
    no gradient), then the group's own counter k = 0, 1, ... (it starts at -1 and is incremented by each
    ``scheduler.step()``) in get_lr_lambda(warmup, total - last_epoch) with last_epoch = add_step + 1."""
    if step <= add_step:
        return 0.0
    k = step - add_step - 1
    horizon = total - (add_step + 1)
    if k < warmup:
        return base * k / max(1, warmup)
    return base * max(0.0, (horizon - k) / max(1, horizon - warmup))


def setup_run(sst2_dir, tmp_path, steps: int, *extra: str):
    cfg, spec, loaded, loader, ctx = build("increlora", sst2_dir, tmp_path, f"train.max_steps={steps}", *extra)
    base_count = sum(
        spec.params["adapter"].rank * (w.shape[0] + w.shape[1] + 1)
        for _, w in target_linear_weights(loaded.model, ctx.target_modules)
    ) + head_parameter_count(loaded.model, ctx.head)
    built = apply_method(loaded.model, spec, ctx)
    warmup = math.ceil(cfg.train.warmup_ratio * steps)
    scheduler = get_scheduler("linear", built.optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    batches = list(itertools.islice(itertools.cycle(loader), steps))
    return built, scheduler, batches, base_count


def forward_backward(built, batch, step: int) -> None:
    built.model.train()
    torch.manual_seed(1000 + step)  # the same dropout masks in every run
    built.model(**batch).loss.backward()
    built.procedure.after_backward(step)


def finish_step(built, scheduler, step: int) -> None:
    built.optimizer.step()
    scheduler.step()
    built.optimizer.zero_grad(set_to_none=True)
    built.procedure.on_step_end(step + 1)


def train(built, scheduler, batches, start: int, stop: int, every=None) -> None:
    for step in range(start, stop):
        forward_backward(built, batches[step], step)
        finish_step(built, scheduler, step)
        if every:
            every(step)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_defaults_are_the_authors():
    from lorabench.methods.procedures.increlora import IncreLoraAllocParams

    p = IncreLoraAllocParams()
    assert p.advance_learn and p.warmup_new and p.reserve_gate == GATE


def test_reserve_is_advance_learned_and_activated_warm(sst2_dir, tmp_path):
    """Each layer reserves its next component with lambda frozen at 1e-5; its P column and Q row train
    before activation; the activated component keeps them and starts from lambda = 1e-5 (not 0)."""
    built, scheduler, batches, _ = setup_run(
        sst2_dir, tmp_path, 24, "method.delta_t=4", "method.target_r=3", "method.new_warmup_ratio=0.1"
    )
    layers = adapter_layers(built.model)
    init = {n: (m.lora_P.detach().clone(), m.lora_Q.detach().clone()) for n, m in layers.items()}
    for m in layers.values():  # init_r = 2 active, component 2 reserved with the frozen gate
        assert m.rank_mask.tolist()[:3] == [1, 1, 0] and m.reserved() == 2 and m.lora_E[2].item() == GATE32
        assert m.gates()[2].item() == GATE32 and m.gates()[3:].abs().sum() == 0
    ranks = {n: m.rank() for n, m in layers.items()}
    activated = []

    def check(step):
        for n, m in layers.items():
            if m.rank() > ranks[n]:
                ranks[n], i = m.rank(), m.rank() - 1
                activated.append((n, i))
                # warm start: lambda starts from the reserve's 1e-5 (no update at the addition step),
                # P and Q from their advance-learned values
                assert m.lora_E[i].item() == GATE32
                assert not torch.equal(m.lora_P[:, i], init[n][0][:, i])
                assert not torch.equal(m.lora_Q[i], init[n][1][i])
            r = m.reserved()
            if r is not None:  # the next component, lambda frozen while reserved
                assert r == m.rank() and m.lora_E[r].item() == GATE32

    train(built, scheduler, batches, 0, 24, every=check)
    assert len(activated) == len(layers)  # budget 3 per layer, 2 to start with
    for m in layers.values():
        assert m.reserved() is None  # budget spent: reserves released
        assert m.gates()[m.rank_mask == 0].abs().sum() == 0
    for n, i in activated:
        assert not torch.equal(layers[n].lora_E[i], torch.tensor(GATE))  # lambda trained after its warm-up


def test_warm_start_off_starts_from_init(sst2_dir, tmp_path):
    """The contrast: without advance learning a new component starts from its init with lambda = 0."""
    built, scheduler, batches, _ = setup_run(
        sst2_dir, tmp_path, 8, "method.delta_t=4", "method.target_r=3", "method.advance_learn=false"
    )
    layers = adapter_layers(built.model)
    init = {n: m.lora_P.detach().clone() for n, m in layers.items()}
    assert all(m.reserved() is None and m.lora_E[2].item() == 0 for m in layers.values())
    train(built, scheduler, batches, 0, 5)  # first addition at step 4
    grown = [n for n, m in layers.items() if m.rank() == 3]
    assert len(grown) == 1
    m = layers[grown[0]]
    assert m.lora_E[2].item() == 0 and torch.equal(m.lora_P[:, 2], init[grown[0]][:, 2])


def test_new_component_lr_follows_the_restarted_schedule(sst2_dir, tmp_path):
    """Step by step, the update of a new component's slices is the optimizer's update scaled to the
    authors' per-group learning rate; initial components are untouched by the scaling."""
    steps, warmup_new = 40, 5
    built, scheduler, batches, _ = setup_run(
        sst2_dir,
        tmp_path,
        steps,
        "method.delta_t=4",
        "method.target_r=3",
        f"method.new_warmup_ratio={warmup_new / steps}",
        "train.weight_decay=0.01",
    )
    proc, opt = built.procedure, built.optimizer
    assert proc.warmup == warmup_new
    layers = adapter_layers(built.model)
    r_max = next(iter(layers.values())).rank_mask.numel()
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    keys = ("lora_P", "lora_Q", "lora_E")
    added: dict[tuple[str, int], int] = {}  # (layer, component) -> step it was activated
    reserved_at: dict[tuple[str, int], int] = {}  # (layer, component) -> step it was reserved
    seen_scaled = 0
    for step in range(steps):
        ranks = {n: m.rank() for n, m in layers.items()}
        forward_backward(built, batches[step], step)
        for n, m in layers.items():
            if m.rank() > ranks[n]:
                added[(n, m.rank() - 1)] = step
            if m.reserved() is not None:
                reserved_at.setdefault((n, m.reserved()), step)
        before = {n: {k: getattr(m, k).detach().clone() for k in keys} for n, m in layers.items()}
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        mults = {n: proc.lr_multipliers(n, step) for n in layers}  # with the lr this step runs at
        opt.step()
        raw = {n: {k: getattr(m, k).detach().clone() for k in keys} for n, m in layers.items()}
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        proc.on_step_end(step + 1)
        for n, m in layers.items():
            base = group_of[id(m.lora_E)]["initial_lr"]
            mult = mults[n]
            assert mult["lora_P"][:2] == [1.0, 1.0] and mult["lora_E"][:2] == [1.0, 1.0]  # run's schedule
            for i in range(2, r_max):
                live = m.rank_mask[i] == 1 or m.reserve_mask[i] == 1
                if live:  # P/Q: the authors' lr of the group made when the component was reserved
                    want = authors_lr(base, reserved_at[(n, i)], step, warmup_new, steps)
                    for key in ("lora_P", "lora_Q"):
                        assert mult[key][i] * lrs[id(getattr(m, key))] == pytest.approx(want, rel=1e-9, abs=1e-15)
                else:  # neither active nor reserved: does not move
                    assert mult["lora_P"][i] == mult["lora_Q"][i] == 0
                if (n, i) in added:  # lambda: the authors' lr of the group made at activation
                    t = added[(n, i)]
                    want = authors_lr(base, t, step, warmup_new, steps)
                    assert mult["lora_E"][i] * lrs[id(m.lora_E)] == pytest.approx(want, rel=1e-9, abs=1e-15)
                    if step in (t, t + 1):  # the restarted warm-up: no update, lr 0, then base / W
                        assert want == 0 and m.lora_E[i].item() == GATE32
                    if step == t + 2:
                        assert want == pytest.approx(base / warmup_new)
                else:
                    assert mult["lora_E"][i] == 0  # a reserve's lambda is frozen
                    if m.reserve_mask[i] == 1:
                        assert m.lora_E[i].item() == GATE32
            # the applied update is the optimizer's, scaled per component
            for key, view in (("lora_P", (1, -1)), ("lora_Q", (-1, 1)), ("lora_E", (-1,))):
                f = torch.tensor(mult[key], dtype=torch.float64).view(view)
                old, new, got = before[n][key].double(), raw[n][key].double(), getattr(m, key).detach().double()
                torch.testing.assert_close(got, old + f * (new - old), rtol=1e-6, atol=1e-9)
                seen_scaled += int(key == "lora_E" and bool(((f > 0) & (f != 1) & (new != old)).any()))
    assert len(added) == len(layers) and seen_scaled > 0


def test_budget_is_never_exceeded(sst2_dir, tmp_path):
    built, scheduler, batches, count = setup_run(
        sst2_dir, tmp_path, 12, "method.delta_t=1", "method.target_r=4", "method.add_per_round=3"
    )
    proc = built.procedure
    layers = adapter_layers(built.model)
    assert sum(p.numel() for p in built.model.parameters() if p.requires_grad) == count

    def check(step):
        assert proc.total_rank() <= proc.budget == 4 * len(layers)
        for m in layers.values():
            assert m.reserve_mask.sum() <= 1 and not (m.reserve_mask.bool() & m.rank_mask.bool()).any()
            if proc.total_rank() < proc.budget and m.rank() < m.rank_mask.numel():
                assert m.reserved() is not None
        if proc.total_rank() == proc.budget:
            assert all(m.reserved() is None for m in layers.values())

    train(built, scheduler, batches, 0, 12, every=check)
    assert proc.total_rank() == proc.budget
    assert sum(p.numel() for p in built.model.parameters() if p.requires_grad) == count
    batch = batches[0]
    out = logits(built.model, batch)
    with torch.no_grad():  # neither inactive nor released components play a part
        for m in layers.values():
            m.lora_P[:, m.rank_mask == 0] = 1.0
    torch.testing.assert_close(logits(built.model, batch), out, rtol=0, atol=0)


def test_resume_mid_training_is_exact(sst2_dir, tmp_path):
    """Checkpoint (trainable tensors, optimizer, scheduler, procedure JSON) in the middle of a
    warm-up, with a reserve mid advance-learning; the resumed run matches the uninterrupted one."""
    steps, cut = 20, 7
    extra = ("method.delta_t=3", "method.target_r=3", "method.new_warmup_ratio=0.2", "train.weight_decay=0.01")
    full, full_sched, batches, _ = setup_run(sst2_dir, tmp_path, steps, *extra)
    train(full, full_sched, batches, 0, steps)

    part, part_sched, _, _ = setup_run(sst2_dir, tmp_path, steps, *extra)
    train(part, part_sched, batches, 0, cut)
    assert 0 < part.procedure.additions < len(adapter_layers(part.model))  # mid-allocation
    tensors = {n: p.detach().clone() for n, p in part.model.named_parameters() if p.requires_grad}
    opt_state = part.optimizer.state_dict()
    sched_state = json.loads(json.dumps(part_sched.state_dict(), default=str))
    proc_state = json.loads(json.dumps(part.procedure.state_dict()))

    resumed, sched, _, _ = setup_run(sst2_dir, tmp_path, steps, *extra)
    with torch.no_grad():
        params = dict(resumed.model.named_parameters())
        for n, t in tensors.items():
            params[n].copy_(t)
    resumed.optimizer.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    resumed.procedure.load_state_dict(proc_state)
    assert resumed.procedure.state_dict() == proc_state
    train(resumed, sched, batches, cut, steps)

    a, b = adapter_layers(full.model), adapter_layers(resumed.model)
    for n in a:
        assert torch.equal(a[n].rank_mask, b[n].rank_mask) and torch.equal(a[n].reserve_mask, b[n].reserve_mask)
    assert resumed.procedure.state_dict() == full.procedure.state_dict()
    torch.testing.assert_close(logits(resumed.model, batches[0]), logits(full.model, batches[0]), rtol=0, atol=0)
