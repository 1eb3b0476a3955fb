"""DiffoRA and Flexora (procedures ``diffora`` and ``flexora``, lorabench/methods/procedures/): the gates,
the hypergradients, the selection and the run that trains the kept LoRA only.

On the 4-layer GQA Llama of tests/parity_flexora_case.py (peft LoRA rank 4 on its targets) with seeded
token batches as the calibration data: the gate gradients of both parameterisations equal central
finite differences (float64); Flexora's unrolled hypergradient equals the analytic one on a quadratic
and finite differences of the one-step-unrolled loss on the model, and the first-order one does not;
DiffoRA's first gate step is Adam's first step on that gradient; the selection keeps exactly the
top-k (a smallest-first rule fails the check); kept modules train while the others stay at B = 0;
exact trainable counts; Flexora's restart is plain LoRA's init on the kept layers (Delta W = 0, the
RNG as plain LoRA leaves it); DiffoRA's weight sharing folds the gate into B; merge = forward =
delta_weight; save / load round trip; Params checks.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import lorabench.methods.procedures.diffora as diffora
import lorabench.methods.procedures.flexora as flexora
from lorabench.errors import ConfigError
from lorabench.method_params.procedures_selection import DifforaParams, FlexoraParams
from lorabench.methods.adapters.layer import load_trainable, save_trainable
from lorabench.methods.base import MethodContext
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.methods.procedures.module_selection import (
    GateHooks,
    gate_gradient,
    lora_candidates,
    split_batches,
    top_k,
    unrolled_hypergradient,
)
from lorabench.methods.spec import resolve_method
from tests.conftest import CONF_DIR
from tests.parity_flexora_case import LORA_SEED, tiny_llama, token_batches

FAST = {"flexora_hyper_batches": 2}  # the authors' 8 in the parity test; 2 keeps these tests quick


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def preset(method: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"))


def build(method: str, targets=("q_proj", "v_proj"), batches: int = 6, lr: float = 1e-2, **overrides):
    raw = {**preset(method), "rank": 4, "alpha": 8.0, "dropout": 0.0, **(FAST if method == "flexora" else {})}
    spec = resolve_method({**raw, **overrides})
    data = token_batches(batches, 5)
    ctx = MethodContext(list(targets), "causal_lm", lr, 0.0, 10, 0, lambda: iter(data))
    base = tiny_llama()
    expected = expected_trainable(base, spec, ctx)
    torch.manual_seed(LORA_SEED)
    return apply_method(base, spec, ctx), spec, ctx, data, expected


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_steps(built, batch, steps: int = 3) -> None:
    built.model.train()
    for step in range(steps):
        built.model(**batch).loss.backward()
        built.procedure.after_backward(step)
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        built.procedure.on_step_end(step + 1)


class DoubleLoss(torch.nn.Module):
    """A 4-layer BERT encoder (hidden 32, LoRA rank 4 on query and value) with a frozen random token head;
    the loss is cross-entropy against the input tokens, all in float64 (Llama's RMSNorm and transformers'
    loss compute in float32, too coarse for finite differences)."""

    def __init__(self, inner, head):
        super().__init__()
        self.inner, self.head = inner, head

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(hidden)
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def lora_model(seed: int = 3) -> DoubleLoss:
    """LoRA with a random B (so every gate matters) on a float64 BERT."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    encoder = BertModel(config, add_pooling_layer=False)
    head = torch.nn.Linear(32, 64).requires_grad_(False)
    torch.manual_seed(LORA_SEED)
    encoder = get_peft_model(encoder, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model = DoubleLoss(encoder, head).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model.eval()


def central_difference(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step.view(-1)[i] = eps
        out.view(-1)[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return out


# -- gates and hypergradients ------------------------------------------------------------------------------
def test_gate_gradients_equal_finite_differences():
    model = lora_model()
    candidates = lora_candidates(model, "test")
    hooks = GateHooks(candidates)
    blocks = torch.tensor([c.block for c in candidates])
    batches = token_batches(2, 7)
    parameterisations = {
        "diffora": (torch.sigmoid, torch.randn(len(candidates), generator=torch.Generator().manual_seed(0))),
        "flexora": (
            lambda a: flexora.layer_gates(a, blocks, 3),
            0.3 * torch.randn(4, generator=torch.Generator().manual_seed(1)),
        ),
    }
    for name, (gates_of, start) in parameterisations.items():
        param = start.double().requires_grad_(True)
        grad, losses = gate_gradient(model, hooks, gates_of, param, batches)

        def total_loss(x, gates_of=gates_of):
            with torch.no_grad():
                hooks.values = gates_of(x)
                return sum(model(**b).loss for b in batches)

        expected = central_difference(total_loss, param.detach())
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=5e-9, msg=name)
        assert len(losses) == 2 and grad.abs().min() > 0, name
    assert all(p.grad is None for p in model.parameters())  # nothing left on the weights
    hooks.remove()


def test_flexora_gate_is_l_softmax_to_the_power():
    alpha = torch.tensor([0.0, 0.0, 0.0, 0.0])
    blocks = torch.tensor([0, 0, 1, 3])
    assert flexora.layer_gates(alpha, blocks, 3).tolist() == [1.0, 1.0, 1.0, 1.0]  # plain LoRA at the start
    alpha = torch.tensor([0.2, -0.1, 0.0, 0.5])
    w = 4 * torch.exp(alpha) / torch.exp(alpha).sum()
    torch.testing.assert_close(flexora.layer_gates(alpha, blocks, 3), w[blocks] ** 3)
    torch.testing.assert_close(flexora.layer_gates(alpha, blocks, 1), w[blocks])


def test_unrolled_hypergradient_is_the_analytic_one_on_a_quadratic():
    """L_tr = 1/2 ||theta - M alpha||^2, L_val = 1/2 ||theta - c||^2 + beta/2 ||alpha||^2: with
    theta' = theta - lr (theta - M alpha), dL_val(theta'(alpha), alpha)/dalpha = lr M^T (theta' - c) + beta alpha;
    the first-order gradient (theta' held fixed) is beta alpha alone."""
    gen = torch.Generator().manual_seed(0)
    m, c = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    alpha = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    lr, beta = 0.3, 0.7

    def train_loss(weights):
        return 0.5 * ((weights[0] - m @ alpha) ** 2).sum()

    def val_loss(weights):
        return 0.5 * ((weights[0] - c) ** 2).sum() + 0.5 * beta * (alpha**2).sum()

    h, grads = unrolled_hypergradient(train_loss, [val_loss, val_loss], [theta], alpha, lr)
    stepped = theta.detach() - lr * (theta.detach() - m @ alpha.detach())
    analytic = 2 * (lr * m.T @ (stepped - c) + beta * alpha.detach())  # two validation terms
    torch.testing.assert_close(h, analytic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], theta.detach() - m @ alpha.detach())
    first_order = 2 * beta * alpha.detach()
    assert (first_order - analytic).abs().max() > 0.1  # not unrolling would miss it


def test_flexora_unrolled_step_equals_finite_differences_of_the_unrolled_loss():
    model = lora_model()
    candidates = lora_candidates(model, "test")
    hooks = GateHooks(candidates)
    blocks = torch.tensor([c.block for c in candidates])
    theta = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    train, val = token_batches(1, 8)[0], token_batches(2, 9)
    lr = 0.5

    def gates_of(a):
        return flexora.layer_gates(a, blocks, 3)

    alpha = (0.2 * torch.randn(4, generator=torch.Generator().manual_seed(2))).double().requires_grad_(True)
    h, grads = flexora._unrolled_step(model, hooks, gates_of, alpha, theta, train, val, lr)

    def unrolled_loss(a):
        hooks.values = gates_of(a)
        g = torch.autograd.grad(model(**train).loss, theta)
        stepped = {n: p.detach() - lr * gi for n, p, gi in zip(names, theta, g)}
        with torch.no_grad():
            return sum(torch.func.functional_call(model, stepped, args=(), kwargs=b).loss for b in val)

    torch.testing.assert_close(h, central_difference(unrolled_loss, alpha.detach()), rtol=1e-5, atol=5e-9)
    # the training gradient it hands on is that of the training loss at the gates
    hooks.values = gates_of(alpha.detach())
    for g, expected in zip(grads, torch.autograd.grad(model(**train).loss, theta)):
        torch.testing.assert_close(g, expected)
    # first order (theta' fixed) differs: the unrolled term matters at this lr
    stepped = {n: p.detach() - lr * g for n, p, g in zip(names, theta, grads)}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in stepped:
                p.copy_(stepped[n])
    first, _ = gate_gradient(model, hooks, gates_of, alpha.detach().clone().requires_grad_(True), val)
    assert (first - h).abs().max() > 1e-3 * h.abs().max()
    hooks.remove()


def test_diffora_first_gate_step_is_adams_first_step_after_the_weight_step(monkeypatch):
    """One search step: the weight step, then a <- a - lr g / (|g| + eps) with g the gate gradient on the
    validation batch at the stepped weights (Adam's first step; a = 0, so the weight decay adds nothing).
    Were the gate step taken first (B = 0: g = 0), a would stay 0."""
    seen = {}
    original = diffora.finish

    def capture(model, candidates, kept, restore=None, scale_kept=None):
        hooks = GateHooks(candidates)
        zero = torch.zeros(len(candidates), requires_grad=True)
        seen["g"], _ = gate_gradient(model, hooks, torch.sigmoid, zero, [seen["val"]])
        hooks.remove()
        return original(model, candidates, kept, restore=restore, scale_kept=scale_kept)

    monkeypatch.setattr(diffora, "finish", capture)
    data = token_batches(2, 5)
    seen["val"] = data[1]
    built, spec, *_ = build("diffora", batches=2)
    logits = torch.tensor(built.procedure.search.history[0])
    lr = spec.params["procedure"].diffora_gate_lr
    expected = -lr * seen["g"] / (seen["g"].abs() + 1e-8)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-9)
    assert logits.abs().min() > 0.5 * lr


# -- the selection -----------------------------------------------------------------------------------------
def test_top_k_and_the_layer_rules():
    assert top_k([0.1, 0.5, 0.5, -1.0], 2) == [1, 2]
    assert top_k([1.0, 1.0, 1.0], 2) == [0, 1]  # ties: the earlier index
    assert top_k([3.0, 1.0, 2.0], 0) == []
    assert flexora.select_layers([-0.1, 0.2, 0.0, 0.3], 0) == [1, 3]  # alpha > 0, not >= 0
    assert flexora.select_layers([-0.1, -0.3, -0.2], 0) == [0]  # none positive: the largest
    assert flexora.select_layers([-0.1, 0.2, 0.0, 0.3], 2) == [1, 3]
    assert flexora.select_layers([-0.1, 0.2, 0.0, 0.3], 9) == [0, 1, 2, 3]
    assert (
        diffora.keep_count(DifforaParams(), 8) == 4
        and diffora.keep_count(DifforaParams(diffora_keep_ratio=0.1), 8) == 1
    )
    assert diffora.keep_count(DifforaParams(diffora_keep_modules=3), 8) == 3
    assert diffora.keep_count(DifforaParams(diffora_keep_modules=30), 8) == 8


def check_kept_are_the_largest(state: dict, k: int) -> None:
    gates = state["diffora_gates"]
    kept = set(state["diffora_kept_modules"])
    assert len(kept) == k
    assert min(gates[n] for n in kept) >= max(gates[n] for n in gates if n not in kept)


def test_diffora_keeps_exactly_the_top_k_gates_and_a_smallest_first_rule_fails(monkeypatch):
    built, *_ = build("diffora", diffora_keep_modules=3, diffora_search_epochs=2)
    state = built.procedure.state()
    assert len(set(state["diffora_gates"].values())) == 8  # the search separated the gates
    check_kept_are_the_largest(state, 3)
    monkeypatch.setattr(
        diffora, "top_k", lambda scores, k: sorted(sorted(range(len(scores)), key=scores.__getitem__)[:k])
    )
    wrong, *_ = build("diffora", diffora_keep_modules=3, diffora_search_epochs=2)
    with pytest.raises(AssertionError):
        check_kept_are_the_largest(wrong.procedure.state(), 3)


def test_flexora_keeps_the_layers_with_positive_alpha_or_the_top_k():
    built, _, _, _, expected = build("flexora", flexora_search_epochs=2)
    state = built.procedure.state()
    alpha = state["flexora_alpha"]
    assert state["flexora_layers"] == [i for i, a in enumerate(alpha) if a > 0] and 0 < len(state["flexora_layers"]) < 4
    kept = {n.split("layers.")[1].split(".")[0] for n in state["flexora_kept_modules"]}
    assert kept == {str(i) for i in state["flexora_layers"]} and len(state["flexora_kept_modules"]) == 2 * len(kept)
    assert expected is None and trainable_count(built.model) == state["flexora_trainable_lora"]
    top, _, _, _, expected = build("flexora", flexora_search_epochs=2, flexora_keep_layers=1)
    assert top.procedure.layers == [max(range(4), key=top.procedure.search.alpha.__getitem__)]
    assert trainable_count(top.model) == expected == 4 * (32 + 32) + 4 * (32 + 16)  # q_proj + GQA v_proj of one layer


# -- the run after the search ----------------------------------------------------------------------------
@pytest.mark.parametrize("method, overrides", [("diffora", {}), ("flexora", {"flexora_keep_layers": 2})])
def test_only_the_kept_lora_trains(method, overrides):
    built, _, _, data, expected = build(method, targets=("q_proj", "o_proj"), **overrides)
    procedure = built.procedure
    kept = set(procedure.kept)
    assert 0 < len(kept) < len(procedure.candidates)
    assert trainable_count(built.model) == expected  # exact: q_proj and o_proj are both 32 x 32
    before = {i: (c.lora_a.detach().clone(), c.lora_b.detach().clone()) for i, c in enumerate(procedure.candidates)}
    train_steps(built, data[0])
    for i, c in enumerate(procedure.candidates):
        a0, b0 = before[i]
        if i in kept:
            assert not torch.equal(c.lora_b, b0) and not torch.equal(c.lora_a, a0), c.name
        else:
            assert torch.equal(c.lora_a, a0) and torch.count_nonzero(c.lora_b) == 0, c.name
            assert not c.lora_a.requires_grad and not c.lora_b.requires_grad


def test_trainable_counts_in_closed_form():
    rank, q_size, v_size = 4, 4 * 64, 4 * 48
    base = tiny_llama()
    for targets, keep, expected in ((("q_proj", "o_proj"), 3, 3 * q_size), (("q_proj", "v_proj"), 3, None)):
        ctx = MethodContext(list(targets), "causal_lm", 1e-3, 0.0, 1, 0)
        params = DifforaParams(rank=rank, diffora_keep_modules=keep)
        assert diffora.Diffora().expected_trainable(base, params, ctx) == expected  # GQA: depends on the winners
    ctx = MethodContext(["q_proj", "v_proj"], "causal_lm", 1e-3, 0.0, 1, 0)
    assert flexora.Flexora().expected_trainable(base, FlexoraParams(rank=rank, flexora_keep_layers=3), ctx) == 3 * (
        q_size + v_size
    )
    assert flexora.Flexora().expected_trainable(base, FlexoraParams(rank=rank, flexora_keep_layers=9), ctx) == 4 * (
        q_size + v_size
    )
    assert (
        flexora.Flexora().expected_trainable(base, FlexoraParams(rank=rank), ctx) is None
    )  # alpha > 0: after the search


def test_flexora_restart_is_plain_loras_init_on_the_kept_layers():
    """Every layer kept: the model after the search is the plain LoRA preset's at the same seed (B = 0, so
    Delta W = 0), and the RNG is where plain LoRA leaves it (the search ran on a fork)."""
    built, *_ = build("flexora", flexora_keep_layers=4)
    after_search = torch.random.get_rng_state()
    plain, *_ = build("lora")
    assert torch.equal(after_search, torch.random.get_rng_state())
    ours = dict(built.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(ours[name], p) and ours[name].requires_grad == p.requires_grad, name
    assert all(torch.count_nonzero(c.lora_b) == 0 for c in built.procedure.candidates)


def test_diffora_weight_sharing_folds_the_gate_into_b(monkeypatch):
    searched = {}
    original = diffora.finish

    def capture(model, candidates, kept, restore=None, scale_kept=None):
        searched.update({c.name: (c.lora_a.detach().clone(), c.lora_b.detach().clone()) for c in candidates})
        return original(model, candidates, kept, restore=restore, scale_kept=scale_kept)

    monkeypatch.setattr(diffora, "finish", capture)
    built, *_ = build("diffora", diffora_search_epochs=2)
    gates = built.procedure.state()["diffora_gates"]
    for i, c in enumerate(built.procedure.candidates):
        a, b = searched[c.name]
        assert torch.equal(c.lora_a, a)
        expected = gates[c.name] * b if i in built.procedure.kept else torch.zeros_like(b)
        torch.testing.assert_close(c.lora_b.detach(), expected, rtol=1e-6, atol=0)
    assert any(torch.count_nonzero(searched[c.name][1]) for c in built.procedure.candidates)
    restart, *_ = build("diffora", diffora_search_epochs=2, diffora_weight_sharing=False)
    assert all(torch.count_nonzero(c.lora_b) == 0 for c in restart.procedure.candidates)  # Delta W = 0 again


def test_merge_equals_forward_and_delta_weight():
    built, _, _, data, _ = build("diffora")
    train_steps(built, data[0], steps=2)
    model = built.model.eval()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for c in built.procedure.candidates:
        with torch.no_grad():
            change = c.layer(x) - c.layer.get_base_layer()(x)
        torch.testing.assert_close(change, x @ c.layer.get_delta_weight("default").T, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = model(**data[1]).logits
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(**data[1]).logits, logits, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_the_resume_check(tmp_path):
    built, _, _, data, _ = build("flexora")
    train_steps(built, data[0], steps=2)
    path = tmp_path / "adapter.safetensors"
    save_trainable(built.model, path)
    again, *_ = build("flexora")  # a rebuild searches again, deterministically
    assert again.procedure.layers == built.procedure.layers
    load_trainable(again.model, path)
    with torch.no_grad():
        built.model.eval(), again.model.eval()
        torch.testing.assert_close(again.model(**data[1]).logits, built.model(**data[1]).logits, rtol=0, atol=0)
    again.procedure.load_state_dict(built.procedure.state_dict())
    assert again.procedure.state()["flexora_search"] == built.procedure.state()["flexora_search"]  # the original's
    with pytest.raises(RuntimeError, match="kept layers"):
        again.procedure.load_state_dict({"layers": [9]})


def test_state_reports_the_search():
    built, *_ = build("diffora", batches=6, diffora_search_epochs=2)
    cost = built.procedure.state()["diffora_search"]
    assert (cost["steps"], cost["train_batches"], cost["val_batches"], cost["val_forwards"]) == (6, 3, 3, 6)
    assert cost["seconds"] > 0
    built, *_ = build("flexora", batches=6, flexora_search_epochs=2)  # 0.04 x 6 rounds to 0: one batch held out
    state = built.procedure.state()
    assert state["flexora_search"]["steps"] == 10 and state["flexora_search"]["val_forwards"] == 20
    assert state["flexora_rule"] == "alpha_positive" and len(state["flexora_alpha"]) == state["flexora_num_layers"] == 4


def test_flexora_unrolled_runs_through_setup_and_needs_no_checkpointing():
    first, _, ctx, _, _ = build("flexora", flexora_search_epochs=2)
    unrolled, *_ = build("flexora", flexora_search_epochs=2, flexora_hypergradient="unrolled")
    assert unrolled.procedure.state()["flexora_hypergradient"] == "unrolled"
    assert unrolled.procedure.search.history[0] != first.procedure.search.history[0]
    assert ctx.extras["flexora_layers"] == first.procedure.layers  # reported from the start
    spec = resolve_method({**preset("flexora"), "flexora_hypergradient": "unrolled"})
    model = spec.components["adapter"].apply(tiny_llama(), spec.params["adapter"], ctx, {})
    model.base_model.model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient_checkpointing=false"):
        spec.components["procedure"].setup(model, None, spec.params["procedure"], ctx)


# -- checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, key, value",
    [
        (DifforaParams, "diffora_keep_ratio", 0.0),
        (DifforaParams, "diffora_keep_ratio", 1.5),
        (DifforaParams, "diffora_keep_modules", -1),
        (DifforaParams, "diffora_val_fraction", 1.0),
        (DifforaParams, "diffora_search_epochs", 0),
        (DifforaParams, "diffora_gate_lr", 0.0),
        (FlexoraParams, "flexora_hypergradient", "second_order"),
        (FlexoraParams, "flexora_keep_layers", -2),
        (FlexoraParams, "flexora_val_fraction", 0.0),
        (FlexoraParams, "flexora_hyper_batches", 0),
        (FlexoraParams, "flexora_gate_power", 0),
        (FlexoraParams, "rank", 0),
    ],
)
def test_params_refuse_bad_values_naming_the_key(cls, key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        cls(**{key: value})


def test_too_few_calibration_batches_and_dora_are_refused():
    ctx = MethodContext(["q_proj"], "causal_lm", 1e-3, 0.0, 1, 0, lambda: iter(token_batches(1, 0)))
    with pytest.raises(ConfigError, match="train.init_batches >= 2"):
        split_batches(ctx, 0.5, "diffora", "cpu")
    ctx.calibration_batches = lambda: iter(token_batches(5, 0))
    train, val = split_batches(ctx, 0.5, "diffora", "cpu")
    assert (len(train), len(val)) == (2, 3) and torch.equal(val[-1]["input_ids"], token_batches(5, 0)[-1]["input_ids"])
    with pytest.raises(ConfigError, match="use_dora"):
        build("diffora", use_dora=True)
    with pytest.raises(ConfigError, match="method.rank=2.*rank 4"):  # a procedure told another rank would miscount
        lora_candidates(lora_model(), "diffora", rank=2)


def test_the_presets_hold_the_authors_values():
    flex = resolve_method(preset("flexora")).params
    assert (flex["adapter"].rank, flex["adapter"].alpha, flex["adapter"].dropout) == (8, 16.0, 0.0)
    p = flex["procedure"]
    assert (p.flexora_keep_layers, p.flexora_hyper_batches, p.flexora_hyper_lr, p.flexora_gate_power) == (0, 8, 0.01, 3)
    assert p.flexora_hypergradient == "first_order" and p.rank == flex["adapter"].rank
    diff = resolve_method(preset("diffora")).params["procedure"]
    assert (diff.diffora_gate_lr, diff.diffora_gate_weight_decay, diff.diffora_val_fraction) == (3e-4, 1e-3, 0.5)
    assert diff.diffora_weight_sharing is True and diff.rank == 8


@pytest.mark.slow  # three short training runs (about 10 s): run with -m slow
def test_an_interrupted_run_resumes_bitwise(sst2_dir, tmp_path, monkeypatch):
    """The resumed run searches again (same calibration batches, same seed: the same modules) and ends as the
    uninterrupted one; its checkpoint's procedure state is checked against the new search."""
    from safetensors.torch import load_file

    from lorabench.checkpoint import list_checkpoints
    from tests.test_resume import run_pair

    a_dir, b_dir = run_pair("diffora", sst2_dir, tmp_path, monkeypatch, "method.diffora_search_epochs=2")
    a, b = ((d / "record.json").read_text() for d in (a_dir, b_dir))
    a, b = json.loads(a), json.loads(b)
    assert b["status"] == "completed" and b["resumed_from"][0]["step"] == 3
    assert a["train_log"] == b["train_log"] and a["metrics"]["final"] == b["metrics"]["final"]
    assert a["method_report"]["diffora_kept_modules"] == b["method_report"]["diffora_kept_modules"]
    wa = load_file(str(list_checkpoints(a_dir)[-1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(b_dir)[-1] / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def test_a_resumed_search_that_kept_other_modules_is_refused():
    from lorabench.methods.procedures.module_selection import check_same_selection

    check_same_selection("flexora", "layers", [0, 2], [0, 2])
    with pytest.raises(RuntimeError, match=r"flexora: the search of the resumed run kept layers \[0, 2\].*kept \[1\]"):
        check_same_selection("flexora", "layers", [0, 2], [1])
