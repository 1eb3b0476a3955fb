"""LaMDA and IncreLoRA against numbers pinned by running their authors' code.

The fixtures come from scripts/parity/lamda.py (ArminAzizi98/LaMDA@8ad34b46e154: ``get_lamda_model``
on peft's LoRA layers and ``gradual_freeze_B`` of their trainer) and scripts/parity/increlora.py
(FeiyuZhang98/IncreLoRA@51a2d734af78: ``SVDLinear``, ``RankAllocator``, their trainer's
``compute_svd_orth_regu`` and their ``Multi_LambdaLR``). Each case is a small MLP (``mlp``: seeded
linear layers with tanh between them) whose hidden linears are the adapted modules; every step draws
an input and a target batch from a CPU generator, seeds torch's generator before the forward (so both
sides draw the same dropout masks), and minimises the mean squared error with ``torch.optim.AdamW``,
gradient clipping at 1.0 and a transformers schedule, in the loop's order: backward, the procedure's
``after_backward`` (the reference's hook at the same point), clipping, step, schedule, zero_grad. The
factors' initial values come from the case's seeded bank on both sides (the init rule is checked
separately). Here lorabench's adapter and procedure run the same cases; the references need not be
installed.

Compared at every step: the loss and the model output (1e-6), gradient and parameter checksums
(1e-5: sums over up to ~5,000 entries), exactly the freezing schedule (LaMDA: PMB columns without
gradient, whether PMB still has one) and the allocation (IncreLoRA: active ranks, created
components, the chosen modules); the importance scores to 1e-4 relative; at the end every
parameter (1e-6, fp32).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from lorabench.methods.base import MethodContext, decay_groups
from tests.parity_case import load_fixture

ROOT = Path(__file__).resolve().parents[1]
PARAM_TOL, CHECKSUM_TOL, SCORE_RTOL = 1e-6, 1e-5, 1e-4
DIGITS = 9  # significant digits kept in fixtures: float32 values round-trip exactly


# ----------------------------------------------------------------------------- the shared case
# (scripts/parity/lamda.py and increlora.py import these, so both sides build and drive the same way)


def mlp(widths: list[int], seed: int) -> nn.Sequential:
    """Linear(w0, w1), Tanh, Linear(w1, w2), ..., Linear(w_{k-1}, w_k): W ~ N(0, 1 / d_in), b ~ N(0, 0.01)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in))
            linear.bias.copy_(0.1 * torch.randn(d_out, generator=gen))
        layers += [linear, nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    model.requires_grad_(False)
    return model


def targets_of(widths: list[int]) -> list[str]:
    """Module names of the adapted linears: every linear but the last (the output layer)."""
    return [str(2 * i) for i in range(len(widths) - 2)]


def batches(widths: list[int], steps: int, seed: int, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, widths[0], generator=gen), torch.randn(batch, widths[-1], generator=gen))
        for _ in range(steps)
    ]


def schedule(optimizer, case: dict):
    return transformers.get_scheduler(
        case["schedule"], optimizer, num_warmup_steps=case["warmup"], num_training_steps=case["steps"]
    )


def rounded(t: torch.Tensor) -> list:
    """A tensor as nested lists of floats with ``DIGITS`` significant digits."""
    flat = [float(f"{v:.{DIGITS}g}") for v in t.detach().double().flatten().tolist()]
    if t.ndim == 0:
        return flat[0]
    out: list = flat
    for size in reversed(t.shape[1:]):
        out = [out[i : i + size] for i in range(0, len(out), size)]
    return out


def checksum(t: torch.Tensor | None) -> list[float]:
    if t is None:
        return [0.0, 0.0]
    x = t.detach().double()
    return [x.sum().item(), x.abs().sum().item()]


def joint_checksum(tensors, created: int | None = None) -> list[float]:
    """[sum, abs sum] over (P, Q, lambda), restricted to the first ``created`` components (10 digits)."""
    if created is not None:
        tensors = (tensors[0][:, :created], tensors[1][:created], tensors[2][:created])
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return [float(f"{v:.10g}") for v in (flat.sum().item(), flat.abs().sum().item())]


def lamda_bank(case: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Initial PMA and S per target, drawn by the reference's rule (nn.Linear's Kaiming uniform)."""
    gen = torch.Generator().manual_seed(case["bank_seed"])
    widths, out = case["widths"], {}
    for name in targets_of(widths):
        d_in, r = widths[int(name) // 2], case["ranks"][name]
        out[name] = {
            "A": (torch.rand(r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in),
            "S": (torch.rand(r, r, generator=gen) * 2 - 1) / math.sqrt(r),
        }
    return out


def leading_zero_columns(g: torch.Tensor) -> int:
    zero = (g == 0).all(dim=0).tolist() + [False]
    return zero.index(False)


def lamda_drive(model: nn.Module, optimizer, scheduler, case: dict, tensors, after_backward) -> dict:
    """The case's steps; ``tensors()`` -> {target: {"B": PMB, "S": core}} of the side under test."""
    model.train()
    record = {"loss": [], "out": [], "grad": [], "zero_cols": [], "has_grad": [], "param": []}
    for step, (x, y) in enumerate(batches(case["widths"], case["steps"], case["data_seed"])):
        torch.manual_seed(case["dropout_seed"] + step)
        out = model(x)
        loss = ((out - y) ** 2).mean()
        loss.backward()
        after_backward(step)
        named = tensors()
        record["loss"].append(loss.item())
        record["out"].append(checksum(out))
        record["grad"].append({n: {k: checksum(t.grad) for k, t in f.items()} for n, f in named.items()})
        record["zero_cols"].append(
            {n: leading_zero_columns(f["B"].grad) for n, f in named.items() if f["B"].grad is not None}
        )
        record["has_grad"].append({n: f["B"].grad is not None for n, f in named.items()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record["param"].append({n: {k: checksum(t) for k, t in f.items()} for n, f in tensors().items()})
    if case["final"] == "full":
        record["final"] = {n: {k: rounded(t) for k, t in f.items()} for n, f in tensors().items()}
    else:  # large case: every 7th entry of each tensor
        record["final"] = {n: {k: rounded(t.flatten()[::7]) for k, t in f.items()} for n, f in tensors().items()}
    return record


def increlora_bank(case: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target, the values of P's columns and Q's rows in creation order (N(0, 0.02^2), the
    reference's draw for every component)."""
    gen = torch.Generator().manual_seed(case["bank_seed"])
    widths, out = case["widths"], {}
    for name in targets_of(widths):
        d_in, d_out = widths[int(name) // 2], widths[int(name) // 2 + 1]
        out[name] = (
            torch.randn(d_out, case["bank_size"], generator=gen) * 0.02,
            torch.randn(case["bank_size"], d_in, generator=gen) * 0.02,
        )
    return out


def increlora_drive(model: nn.Module, optimizer, scheduler, case: dict, side) -> dict:
    """The case's steps. ``side`` gives: ``loss_extra()`` (the reference's regulariser, 0 for ours),
    ``after_backward(step)``, ``allocate(step)`` (after clipping: the reference's allocator; nothing
    for ours), ``factors()`` -> {target: (P, Q, E, P.grad, Q.grad, E.grad)} over created components,
    ``ranks()``, ``scores()`` and ``last_round()``."""
    model.train()
    keys = ("loss", "out", "grad", "param", "ranks", "created", "scores", "rounds")
    record: dict = {k: [] for k in keys}
    for step, (x, y) in enumerate(batches(case["widths"], case["steps"], case["data_seed"])):
        torch.manual_seed(case["dropout_seed"] + step)
        out = model(x)
        task = ((out - y) ** 2).mean()
        (task + side.loss_extra()).backward()
        created_at_forward = {n: f[0].shape[1] for n, f in side.factors().items()}
        side.after_backward(step)
        factors = side.factors()
        record["loss"].append(task.item())
        record["out"].append(checksum(out))
        record["grad"].append({n: joint_checksum(f[3:], created_at_forward[n]) for n, f in factors.items()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        side.allocate(step)
        record["ranks"].append(side.ranks())
        record["created"].append({n: f[0].shape[1] for n, f in side.factors().items()})
        record["scores"].append(side.scores())
        record["rounds"].append(side.last_round())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        side.on_step_end(step)
        record["param"].append({n: joint_checksum(f[:3]) for n, f in side.factors().items()})
    record["final"] = {n: [rounded(t) for t in f[:3]] for n, f in side.factors().items()}
    return record


# ----------------------------------------------------------------------------- comparisons


def max_nested_diff(ours, ref) -> float:
    if isinstance(ref, dict):
        assert set(ours) == set(ref), (sorted(ours), sorted(ref))
        return max((max_nested_diff(ours[k], ref[k]) for k in ref), default=0.0)
    if isinstance(ref, list):
        assert len(ours) == len(ref), (len(ours), len(ref))
        return max((max_nested_diff(a, b) for a, b in zip(ours, ref)), default=0.0)
    return abs(float(ours) - float(ref))


def compare_common(ours: dict, ref: dict) -> dict[str, float]:
    gaps = {
        "loss": max_nested_diff(ours["loss"], ref["loss"]),
        "out": max_nested_diff(ours["out"], ref["out"]),
        "grad": max_nested_diff(ours["grad"], ref["grad"]),
        "param": max_nested_diff(ours["param"], ref["param"]),
        "final": max_nested_diff(ours["final"], ref["final"]),
    }
    assert gaps["loss"] <= PARAM_TOL and gaps["out"] <= CHECKSUM_TOL, gaps
    assert gaps["grad"] <= CHECKSUM_TOL and gaps["param"] <= CHECKSUM_TOL, gaps
    assert gaps["final"] <= PARAM_TOL, gaps
    return gaps


# ----------------------------------------------------------------------------- LaMDA


LAMDA_CASES = ["reference_defaults", "preset", "mixed_ranks"]


def run_lamda(case: dict) -> dict:
    from lorabench.methods.adapters.lamda import LamdaAdapter, LamdaLayer, LamdaParams
    from lorabench.methods.adapters.layer import wrap_targets
    from lorabench.methods.procedures.lamda import LamdaFreeze, LamdaFreezeParams

    widths, targets = case["widths"], targets_of(case["widths"])
    model = mlp(widths, case["model_seed"])
    ctx = MethodContext(targets, "causal_lm", case["lr"], case["weight_decay"], case["steps"], seed=0)
    params = LamdaParams(rank=max(case["ranks"].values()), alpha=case["alpha"], dropout=case["dropout"])
    adapter = LamdaAdapter()
    model = wrap_targets(
        model, targets, lambda n, lin: adapter.make_layer(n, lin, params, ctx, case["ranks"][n]), "causal_lm"
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    with torch.no_grad():
        for name, init in lamda_bank(case).items():
            layers[name].lora_A.copy_(init["A"])
            layers[name].lora_M.copy_(init["S"])
    optimizer = torch.optim.AdamW(decay_groups(model, case["weight_decay"]), lr=case["lr"])
    proc = LamdaFreeze()
    proc.setup(model, optimizer, LamdaFreezeParams(pmb_freeze_every=case["eta"]), ctx)
    tensors = lambda: {n: {"B": m.lora_B, "S": m.lora_M} for n, m in layers.items()}  # noqa: E731
    return lamda_drive(model, optimizer, schedule(optimizer, case), case, tensors, proc.after_backward)


@pytest.mark.parametrize("name", LAMDA_CASES)
def test_lamda_matches_the_authors_code(name):
    case = load_fixture("lamda")["cases"][name]
    ours = run_lamda(case["settings"])
    ref = case["record"]
    assert ours["zero_cols"] == ref["zero_cols"] and ours["has_grad"] == ref["has_grad"]  # the schedule, exactly
    compare_common(ours, ref)


def test_lamda_cases_cover_the_freezing_schedule():
    cases = load_fixture("lamda")["cases"]
    assert sorted(cases) == sorted(LAMDA_CASES)
    for case in cases.values():
        assert case["settings"]["steps"] >= 10
        assert max(max(z.values(), default=0) for z in case["record"]["zero_cols"]) == 3  # eta = 0.3: t up to 3
    stopped = [n for n, has in cases["mixed_ranks"]["record"]["has_grad"][-1].items() if not has]
    assert sorted(stopped) == ["0", "4"]  # ranks 2 and 3 stop training, rank 8 does not


def test_lamda_init_follows_the_authors_rule():
    """Our own init (not the bank): PMB = 0, PMA and S within nn.Linear's Kaiming bound, PMA frozen;
    the fixture holds the same statistics of the reference's init."""
    from lorabench.methods.adapters.lamda import LamdaAdapter, LamdaParams

    ref = load_fixture("lamda")["init"]
    linear = nn.Linear(64, 80).requires_grad_(False)
    ctx = MethodContext(["x"], "causal_lm", 1e-3, 0.0, 10, seed=0)
    layer = LamdaAdapter().make_layer("x", linear, LamdaParams(rank=16), ctx)
    stats = {
        "B_absmax": layer.lora_B.abs().max().item(),
        "A_scaled_absmax": (layer.lora_A.abs().max() * math.sqrt(64)).item(),
        "A_scaled_absmean": (layer.lora_A.abs().mean() * math.sqrt(64)).item(),
        "S_scaled_absmax": (layer.lora_M.abs().max() * math.sqrt(16)).item(),
        "S_scaled_absmean": (layer.lora_M.abs().mean() * math.sqrt(16)).item(),
    }
    assert stats["B_absmax"] == ref["B_absmax"] == 0
    for key in ("A_scaled_absmax", "S_scaled_absmax"):
        assert stats[key] <= 1 and ref[key] <= 1 + 1e-2  # the reference's S is rounded to bfloat16
    for key in ("A_scaled_absmean", "S_scaled_absmean"):  # U(-1, 1) after scaling: mean |u| = 1/2
        assert abs(stats[key] - 0.5) < 0.05 and abs(ref[key] - 0.5) < 0.05
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["lora_B", "lora_M"] and ref["trainable"] == ["lora_B", "sigma"]
    assert ref["S_dtype"] == "torch.bfloat16"  # the deviation kept: ours is the adapter dtype
    assert layer.scale == 16 / 16 and ref["scaling"] == 16 / 16


# ----------------------------------------------------------------------------- IncreLoRA


INCRELORA_CASES = ["reference_defaults", "preset", "release", "no_advance"]


class OurIncreLora:
    """lorabench's increlora adapter and procedure on a case, with the driver's interface."""

    def __init__(self, case: dict):
        from lorabench.methods.adapters.increlora import IncreLoraAdapter, IncreLoraLayer, IncreLoraParams
        from lorabench.methods.procedures.increlora import IncreLoraAllocator, IncreLoraAllocParams

        widths, targets = case["widths"], targets_of(case["widths"])
        ctx = MethodContext(targets, "causal_lm", case["lr"], case["weight_decay"], case["steps"], seed=0)
        keys = ("target_r", "add_per_round", "incre_rank_num")
        adapter_params = IncreLoraParams(
            rank=0, init_r=case["init_r"], alpha=case["alpha"], dropout=case["dropout"], **{k: case[k] for k in keys}
        )
        self.model = IncreLoraAdapter().apply(mlp(widths, case["model_seed"]), adapter_params, ctx, {})
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, IncreLoraLayer)}
        self.r_max = ctx.extras["increlora_r_max"]
        with torch.no_grad():
            for name, (p, q) in increlora_bank(case).items():
                self.layers[name].lora_P.copy_(p[:, : self.r_max])
                self.layers[name].lora_Q.copy_(q[: self.r_max])
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, case["weight_decay"]), lr=case["lr"])
        self.scheduler = schedule(self.optimizer, case)
        self.proc = IncreLoraAllocator()
        proc_keys = (*keys, "tinit", "delta_t", "interval_ratio", "orth_reg_weight", "advance_learn")
        proc_params = IncreLoraAllocParams(**{k: case[k] for k in proc_keys}, new_warmup_ratio=case["new_warmup_ratio"])
        self.proc.setup(self.model, self.optimizer, proc_params, ctx)
        assert self.proc.warmup == case["warmup"]

    def loss_extra(self):
        return 0.0

    def after_backward(self, step):
        self.proc.after_backward(step)

    def allocate(self, step):
        pass

    def on_step_end(self, step):
        self.proc.on_step_end(step + 1)

    def factors(self):
        out = {}
        for n, m in self.layers.items():
            c = int(m.created().sum())
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (m.lora_P, m.lora_Q, m.lora_E)]
            out[n] = (m.lora_P[:, :c], m.lora_Q[:c], m.lora_E[:c], grads[0][:, :c], grads[1][:c], grads[2][:c])
        return out

    def ranks(self):
        return {n: m.rank() for n, m in self.layers.items()}

    def scores(self):
        return {n: float(s) for n, s in self.proc.module_scores().items()}

    def last_round(self):
        r = self.proc.last_round
        return [r["step"], r["chosen"]] if r else None


def run_increlora(case: dict) -> tuple[dict, OurIncreLora]:
    side = OurIncreLora(case)
    return increlora_drive(side.model, side.optimizer, side.scheduler, case, side), side


@pytest.mark.parametrize("name", INCRELORA_CASES)
def test_increlora_matches_the_authors_code(name):
    case = load_fixture("increlora")["cases"][name]
    ours, side = run_increlora(case["settings"])
    ref = case["record"]
    assert side.r_max == case["r_max"]
    for key in ("ranks", "created", "rounds"):  # the allocation, exactly
        assert ours[key] == ref[key], key
    for got, want in zip(ours["scores"], ref["scores"]):
        for n in want:
            assert got[n] == pytest.approx(want[n], rel=SCORE_RTOL, abs=1e-12), n
    compare_common(ours, ref)


def test_increlora_cases_cover_rounds_release_and_overshoot():
    fixture = load_fixture("increlora")
    cases = fixture["cases"]
    assert sorted(cases) == sorted(INCRELORA_CASES)
    for name, case in cases.items():
        settings, record = case["settings"], case["record"]
        budget = settings["target_r"] * len(targets_of(settings["widths"]))
        rounds = {tuple(r[1]) for r in record["rounds"] if r}
        assert settings["steps"] >= 10 and len(rounds) >= 3, name
        total = sum(record["ranks"][-1].values())
        assert total == budget if name in ("release", "no_advance") else total > budget, (name, total)


def test_increlora_defaults_are_the_authors_sst2_script():
    from lorabench.methods.adapters.increlora import IncreLoraParams, components_per_round
    from lorabench.methods.procedures.increlora import IncreLoraAllocParams

    a, p = IncreLoraParams(), IncreLoraAllocParams()
    assert (a.init_r, a.alpha, a.dropout, a.target_r, a.add_per_round) == (1, 16.0, 0.3, 8, 6)
    assert components_per_round(p.target_r, p.incre_rank_num) == 4  # 4 components to each of 6 modules
    assert (p.ipt_beta1, p.ipt_beta2, p.orth_reg_weight, p.reserve_gate) == (0.85, 0.85, 0.1, 1e-5)
    assert p.advance_learn and p.warmup_new and p.tinit == -1 and p.delta_t == 0
