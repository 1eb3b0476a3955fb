"""IncreLoRA's reserves (advance learning), rounds, budget and the separate AdamW groups of new
components, as in the authors' code (FeiyuZhang98/IncreLoRA: loralib/loralib/increlora.py,
NLU/src/transformers/optimization.py ``Multi_LambdaLR``), on the tiny BERT (4 adapted modules).
tests/test_parity_lamda_increlora.py compares the whole trajectory with the authors' code; these
check the mechanics one by one, and resuming."""

from __future__ import annotations

import itertools
import json
import math

import torch
from transformers import get_scheduler

from lorabench.methods.adapters.layer import adapter_layers
from lorabench.methods.build import apply_method
from tests.method_harness import build

GATE = 1e-5  # the authors' frozen lambda of a reserved component (add_reserve_param)
GATE32 = float(torch.tensor(GATE, dtype=torch.float32))  # as stored in the float32 lambda
# budget 4 x 4 = 16 from 4 x 1; target_r 4 -> 2 components per round; 2 modules a round: 4 -> 8 -> 12 -> 16
SCHEDULE = ("method.target_r=4", "method.add_per_round=2", "method.delta_t=3", "method.tinit=3")


def authors_lr(base: float, add_step: int, step: int, warmup: int, total: int) -> float:
    """The learning rate the authors' ``Multi_LambdaLR`` gives, at optimizer step ``step``, to a param
    group added before ``optimizer.step()`` of ``add_step``: its own counter k = 0, 1, ... from the
    next step in get_lr_lambda(warmup, total - (add_step + 1))."""
    k = step - add_step - 1
    horizon = total - (add_step + 1)
    if k < warmup:
        return base * k / max(1, warmup)
    return base * max(0.0, (horizon - k) / max(1, horizon - warmup))


def setup_run(sst2_dir, tmp_path, steps: int, *extra: str):
    cfg, spec, loaded, loader, ctx = build(
        "increlora", sst2_dir, tmp_path, f"train.max_steps={steps}", "train.lr=2e-2", "method.dropout=0", *extra
    )
    built = apply_method(loaded.model, spec, ctx)
    warmup = math.ceil(cfg.train.warmup_ratio * steps)
    scheduler = get_scheduler("linear", built.optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    batches = list(itertools.islice(itertools.cycle(loader), steps))
    return built, scheduler, batches, warmup


def forward_backward(built, batch, step: int) -> None:
    built.model.train()
    torch.manual_seed(1000 + step)
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


def test_reserves_come_after_step_0_and_start_warm(sst2_dir, tmp_path):
    """No reserve before the first backward (the model is W0 at step 0); then a = 2 reserves per module
    with lambda frozen at 1e-5 whose P and Q train; an activated reserve keeps them and starts from
    lambda = 1e-5, which stays put at the activation step and the next (restarted warm-up)."""
    built, scheduler, batches, _ = setup_run(sst2_dir, tmp_path, 16, *SCHEDULE, "method.new_warmup_ratio=0.1")
    layers = adapter_layers(built.model)
    init = {n: (m.lora_P.detach().clone(), m.lora_Q.detach().clone()) for n, m in layers.items()}
    assert all(m.rank() == 1 and not m.reserve_mask.any() and m.gates().abs().sum() == 0 for m in layers.values())
    forward_backward(built, batches[0], 0)
    for m in layers.values():
        assert m.reserved() == [1, 2] and m.lora_E[1:3, 0].tolist() == [GATE32, GATE32]
    finish_step(built, scheduler, 0)
    activated = {}

    def check(step):
        for n, m in layers.items():
            for i in m.rank_mask.nonzero()[:, 0].tolist():
                if i >= 1 and (n, i) not in activated:
                    activated[(n, i)] = step
            for (name, i), t in activated.items():
                if name == n and step <= t + 1:  # no update at t, lr 0 at t + 1
                    assert m.lora_E[i, 0].item() == GATE32
            frozen = GATE32 if built.procedure.total_rank() < built.procedure.budget else 0.0  # 0: released
            assert all(m.lora_E[i, 0].item() == frozen for i in m.reserved())

    train(built, scheduler, batches, 1, 16, every=check)
    assert sorted(set(activated.values())) == [6, 9, 12]
    for n, i in activated:
        m = layers[n]
        assert not torch.equal(m.lora_P[:, i], init[n][0][:, i]) and not torch.equal(m.lora_Q[i], init[n][1][i])
        assert m.lora_E[i, 0].item() != GATE32  # lambda trained after its restarted warm-up (2 steps)


def test_warm_start_off_keeps_reserves_frozen(sst2_dir, tmp_path):
    """Without advance learning reserves have lambda = 0 and frozen P, Q until activated."""
    built, scheduler, batches, _ = setup_run(sst2_dir, tmp_path, 8, *SCHEDULE, "method.advance_learn=false")
    layers = adapter_layers(built.model)
    init = {n: (m.lora_P.detach().clone(), m.lora_Q.detach().clone()) for n, m in layers.items()}
    train(built, scheduler, batches, 0, 6)  # first round at step 6
    for n, m in layers.items():
        assert m.reserved() == [1, 2] and m.lora_E[1:3].abs().sum() == 0
        assert torch.equal(m.lora_P[:, 1:3], init[n][0][:, 1:3]) and torch.equal(m.lora_Q[1:3], init[n][1][1:3])
    forward_backward(built, batches[6], 6)
    grown = [n for n, m in layers.items() if m.rank() == 3]
    assert len(grown) == 2 and all(layers[n].reserved() == [3, 4] for n in grown)


def test_new_components_step_as_their_own_adamw_groups(sst2_dir, tmp_path):
    """Each new component's slices follow torch's AdamW run on a separate tensor with the same
    gradients, its own step count and the authors' restarted learning rate (weight decay on)."""
    steps = 16
    built, scheduler, batches, warmup = setup_run(
        sst2_dir, tmp_path, steps, *SCHEDULE, "method.new_warmup_ratio=0.1", "train.weight_decay=0.1"
    )
    layers = adapter_layers(built.model)
    shadows: dict = {}  # (layer, key, component) -> (parameter, optimizer, start step)
    base = built.optimizer.param_groups[0]["initial_lr"]
    proc, seen = built.procedure, set()

    def slice_of(m, key, i, tensors=None):
        p, q, e = tensors or (m.lora_P, m.lora_Q, m.lora_E)
        return {"P": p[:, i], "Q": q[i], "E": e[i]}[key]

    for step in range(steps):
        forward_backward(built, batches[step], step)
        grads = {}
        for name, m in layers.items():
            for key, starts in (("P", proc.pq_start[name]), ("Q", proc.pq_start[name]), ("E", proc.e_start[name])):
                for i, s in enumerate(starts):
                    if s is not None and s >= 0 and (name, key, i) not in shadows:
                        shadow = torch.nn.Parameter(slice_of(m, key, i).detach().clone())
                        opt = torch.optim.AdamW([shadow], lr=base, weight_decay=0.1)
                        shadows[(name, key, i)] = (shadow, opt, s)
            grads[name] = (m.lora_P.grad.clone(), m.lora_Q.grad.clone(), m.lora_E.grad.clone())
        finish_step(built, scheduler, step)
        for (name, key, i), (shadow, opt, s) in shadows.items():
            if step <= s:
                continue
            shadow.grad = slice_of(None, key, i, grads[name]).clone()
            for group in opt.param_groups:
                group["lr"] = authors_lr(base, s, step, warmup, steps)
            opt.step()
            torch.testing.assert_close(slice_of(layers[name], key, i), shadow.detach(), rtol=0, atol=1e-7)
            seen.add(key)
    assert seen == {"P", "Q", "E"}


def test_exact_budget_releases_the_reserves(sst2_dir, tmp_path):
    built, scheduler, batches, _ = setup_run(sst2_dir, tmp_path, 16, *SCHEDULE)
    proc, layers = built.procedure, adapter_layers(built.model)
    train(built, scheduler, batches, 0, 13)
    assert proc.total_rank() == proc.budget == 16 and proc.rounds == 3
    for m in layers.values():  # released: created, lambda 0, out of the forward; scoring off
        assert len(m.reserved()) == 2 and m.lora_E[m.reserve_mask.bool()].abs().sum() == 0
        assert not m.track_score
    out = logits(built.model, batches[0])
    with torch.no_grad():
        for m in layers.values():
            m.lora_P[:, m.rank_mask == 0] = 1.0
    torch.testing.assert_close(logits(built.model, batches[0]), out, rtol=0, atol=0)
    assert proc.state()["increlora_total_rank"] == 16


def test_last_round_may_pass_the_budget(sst2_dir, tmp_path):
    """target_r 6 (3 per round), 2 modules a round: 4 -> 10 -> 16 -> 22 -> 28 > 24, as the authors'
    k = min(top_h, budget left) counts modules against a budget in ranks; no release then."""
    extra = ("method.target_r=6", "method.add_per_round=2", "method.delta_t=1", "method.tinit=0")
    built, scheduler, batches, _ = setup_run(sst2_dir, tmp_path, 8, *extra)
    proc, layers = built.procedure, adapter_layers(built.model)
    totals = []
    train(built, scheduler, batches, 0, 8, every=lambda step: totals.append(proc.total_rank()))
    assert totals[:6] == [4, 10, 16, 22, 28, 28] and proc.budget == 24
    assert all(m.lora_E[m.reserve_mask.bool(), 0].tolist() == [GATE32] * 3 for m in layers.values())
    assert built.procedure.state()["increlora_rounds"] == 4


def test_resume_mid_training_is_exact(sst2_dir, tmp_path):
    """Checkpoint (trainable tensors, optimizer, scheduler, procedure JSON) between rounds, with new
    components mid warm-up; the resumed run matches the uninterrupted one."""
    steps, cut = 16, 8
    extra = (*SCHEDULE, "method.new_warmup_ratio=0.1", "train.weight_decay=0.01")
    full, full_sched, batches, _ = setup_run(sst2_dir, tmp_path, steps, *extra)
    train(full, full_sched, batches, 0, steps)

    part, part_sched, _, _ = setup_run(sst2_dir, tmp_path, steps, *extra)
    train(part, part_sched, batches, 0, cut)
    assert part.procedure.rounds == 1
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
