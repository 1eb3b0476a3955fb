"""The properties that catch a wrong wiring of the peft-backed methods (beyond the method matrix):
what trains, what the init reproduces at step 0, closed-form trainable counts, save/load and
merge round trips, AdaLoRA's allocator, the CUDA-only presets' validation, and the intruder metric."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorabench.analysis.intruders import intruder_count, model_intruders, snapshot
from lorabench.errors import ConfigError
from lorabench.methods.build import apply_method
from lorabench.methods.catalog import load_presets
from lorabench.methods.spec import resolve_method
from tests.conftest import CONF_DIR
from tests.method_harness import build, changed, one_step

PRESETS = load_presets(CONF_DIR / "method")


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _first_batch(loader) -> dict:
    return next(iter(loader))


@pytest.fixture(scope="module")
def stepped(sst2_dir: Path, tmp_path_factory):
    """One optimizer step of a preset on tiny_bert, computed once per module and shared (read-only)."""
    cache = {}

    def get(method: str):
        if method not in cache:
            cache[method] = one_step(method, sst2_dir, tmp_path_factory.mktemp(method))
        return cache[method]

    return get


# -- what trains -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ffa_lora", "lorafa"])
def test_frozen_a_stays_at_init_and_b_moves(method, stepped):
    result = stepped(method)
    a_names = [n for n in result.before if ".lora_A." in n]
    b_names = [n for n in result.before if ".lora_B." in n]
    assert a_names and b_names
    assert not any(n in result.trainable for n in a_names), "lora_A must be frozen"
    assert all(torch.equal(result.before[n], result.after[n]) for n in a_names)
    assert all(result.before[n].abs().sum() > 0 for n in a_names), "A keeps its random (non-zero) init"
    assert all(n in changed(result) for n in b_names), "every B must move"


def test_dora_trains_the_magnitude_vector(stepped):
    result = stepped("dora")
    mags = [n for n in result.before if "lora_magnitude_vector" in n]
    assert len(mags) == 4  # 2 layers x (query, value)
    assert set(mags) <= result.trainable
    assert set(mags) <= changed(result)


def test_loraplus_gives_b_a_larger_learning_rate(stepped):
    result = stepped("loraplus")
    model, opt = result.built.model, result.built.optimizer
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    a = [lr_of[id(p)] for n, p in named.items() if ".lora_A." in n]
    b = [lr_of[id(p)] for n, p in named.items() if ".lora_B." in n]
    assert set(a) == {result.ctx.lr} and set(b) == {16 * result.ctx.lr}


# -- closed-form trainable counts, by hand for tiny_bert -----------------------------------------------
# tiny_bert: 2 layers, query/value targets of 32x32 each (4 targets), classification head 2x32 + 2 = 66.
HAND_COUNTS = {
    "lora": 4 * 8 * (32 + 32) + 66,  # r (d_in + d_out)
    "dora": 4 * (8 * 64 + 32) + 66,  # + magnitude (d_out)
    "ffa_lora": 4 * 8 * 32 + 66,  # B only
    "rslora": 4 * 64 * 64 + 66,  # same as LoRA at r = 64
    "vera": 4 * (256 + 32) + 66,  # d (r) + b (d_out)
    "randlora": 4 * 1 * (32 + 32) + 66,  # n = ceil(32 / 32) = 1 base: n (r + min(d))
    "miss": 4 * 16 * 32 + 66,  # r x d_out shard
    "bone": 4 * (32 // 16) * 16 * 16 + 66,  # d_out / r blocks of r x r
    "adalora": 4 * 12 * (32 + 32 + 1) + 66,  # init_r (d_in + d_out + 1)
}


@pytest.mark.parametrize("method", sorted(HAND_COUNTS))
def test_trainable_count_matches_hand_count(method, stepped):
    result = stepped(method)
    count = sum(result.after[n].numel() for n in result.trainable)
    assert count == HAND_COUNTS[method] == result.expected_trainable


@pytest.mark.parametrize("method", ["lora", "vera", "randlora", "miss"])
def test_closed_form_on_a_causal_lm_with_unequal_shapes(method, gsm8k_dir: Path, tmp_path: Path):
    """tiny_llama has grouped-query attention, so v_proj is 16x32 and q_proj 32x32: the formulas
    must use the right dimension (d_in vs d_out, min(d))."""
    extra = ("method.rank=8",) if method in ("randlora", "miss") else ()
    result = one_step(method, gsm8k_dir, tmp_path, *extra, kind="causal_lm")
    shapes = {tuple(result.before[n].shape) for n in result.before if n.endswith("v_proj.base_layer.weight")}
    assert shapes == {(16, 32)}
    count = sum(result.after[n].numel() for n in result.trainable)
    assert count == result.expected_trainable


# -- inits: what they reproduce at step 0 ---------------------------------------------------------------
def test_pissa_residual_plus_adapter_is_the_pretrained_weight(sst2_dir: Path, tmp_path: Path):
    _, spec, loaded, _, ctx = build("pissa", sst2_dir, tmp_path)
    w0 = snapshot(loaded.model, ctx.target_modules)
    model = apply_method(loaded.model, spec, ctx).model
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            w_res, s = module.base_layer.weight, module.scaling["default"]
            base_name = name.removeprefix("base_model.model.") + ".weight"
            assert not torch.allclose(w_res, w0[base_name]), "the residual must differ from W0"
            torch.testing.assert_close(w_res + s * b @ a, w0[base_name], atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == 4


@pytest.mark.parametrize("method", ["lora_ga", "eva", "olora", "corda"])
def test_data_driven_init_leaves_the_model_output_unchanged(method, sst2_dir: Path, tmp_path: Path):
    _, spec, loaded, loader, ctx = build(method, sst2_dir, tmp_path)
    batch = _first_batch(loader)
    base = copy.deepcopy(loaded.model)
    model = apply_method(loaded.model, spec, ctx).model
    a = [p for n, p in model.named_parameters() if ".lora_A." in n]
    assert a and all(p.abs().sum() > 0 for p in a)
    torch.testing.assert_close(_logits(model, batch), _logits(base, batch), atol=1e-4, rtol=1e-4)
    if method == "eva":
        pattern = ctx.extras["rank_pattern"]
        assert len(pattern) == 4 and sum(pattern.values()) == 4 * 8  # the budget L * r is kept


def test_eva_refuses_calibration_batches_too_small_for_its_svd(sst2_dir: Path, tmp_path: Path):
    """peft cycles the batches until the SVD converges and skips any with fewer tokens than rho * r
    components: with none large enough it never returned (rank 32 on the 2 x 2-sentence fixture)."""
    _, spec, loaded, _, ctx = build("eva", sst2_dir, tmp_path, "method.rank=32", "hardware.micro_batch_size=2")
    tokens = max(int(b["attention_mask"].sum()) for b in ctx.calibration_batches())
    assert tokens < 64
    with pytest.raises(ConfigError, match=rf"at least rho \* r = 64 tokens.*method.rank=32.*has {tokens}\b"):
        apply_method(loaded.model, spec, ctx)


def test_lora_ga_init_is_driven_by_the_gradient(sst2_dir: Path, tmp_path: Path):
    """LoRA-GA's A must span the top right-singular vectors of the averaged gradient, not be random."""
    _, spec, loaded, _, ctx = build("lora_ga", sst2_dir, tmp_path)
    model = loaded.model
    target = "bert.encoder.layer.0.attention.self.query"
    model.train()
    model.zero_grad()
    torch.manual_seed(123)  # the same dropout masks as in the preprocessing below (the loader draws a seed too)
    n = 0
    for batch in ctx.calibration_batches():
        model(**batch).loss.backward()
        n += 1
    grad = model.get_submodule(target).weight.grad.detach().clone() / n
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    wrapped = apply_method(model, spec, ctx).model
    a = wrapped.get_submodule("base_model.model." + target).lora_A["default"].weight.detach()
    v = torch.linalg.svd(grad, full_matrices=False)[2][:8]  # top-r right singular vectors
    overlap = torch.linalg.matrix_norm(a @ v.T) / torch.linalg.matrix_norm(a)
    assert overlap > 0.99


def test_lora_ga_init_is_the_same_whether_the_estimate_is_computed_or_cached(sst2_dir, tmp_path, monkeypatch):
    """peft's init takes a randomized SVD of each gradient: a run that finds the estimate cached (a
    resumed run, the next rate of a sweep) must draw it from the same RNG state as the run that
    computed it, or it starts from other A0, B0 and another frozen W0 - s B0 A0."""
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    weights, reports = [], []
    for attempt in ("computed", "cached"):
        _, spec, loaded, _, ctx = build("lora_ga", sst2_dir, tmp_path / attempt)
        ctx.calibration_key = "same-model-and-data"
        model = apply_method(loaded.model, spec, ctx).model
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        reports.append((ctx.extras["lora_ga_gradient_cache"]["hit"], ctx.extras["lora_ga_batches"]))
    assert reports == [(False, 2), (True, 2)]  # the harness hands the initializer 2 batches
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_lora_ga_gradient_cache_key_holds_the_seed_only_when_the_estimate_depends_on_it(tmp_path, monkeypatch):
    """A pretrained causal LM without dropout shares one estimate across seeds; a seeded head, weights
    drawn from the seed, or active dropout (peft estimates in train mode) make the key per seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabench.methods.base import MethodContext
    from lorabench.methods.initializers.lora_ga import gradient_cache

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    config = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)

    def paths(model, head="causal_lm"):
        return {
            gradient_cache(MethodContext(["q_proj"], head, 1e-3, 0.0, 4, seed, calibration_key="k"), model).name
            for seed in (0, 1)
        }

    model = LlamaForCausalLM(LlamaConfig(**config, attention_dropout=0.0))
    model.config._name_or_path = "org/pretrained"
    assert paths(model) == {"k-q_proj.safetensors"}
    assert paths(model, head="classification") == {"k-q_proj-seed0.safetensors", "k-q_proj-seed1.safetensors"}
    dropping = LlamaForCausalLM(LlamaConfig(**config, attention_dropout=0.1))
    dropping.config._name_or_path = "org/pretrained"
    assert len(paths(dropping)) == 2
    model.config._name_or_path = ""  # built from a config: every weight comes from the seed
    assert len(paths(model)) == 2


# -- AdaLoRA's allocator --------------------------------------------------------------------------------
def test_adalora_allocator_prunes_ranks_to_the_target_budget(sst2_dir: Path, tmp_path: Path):
    result = one_step(
        "adalora",
        sst2_dir,
        tmp_path,
        "train.max_steps=6",
        "method.init_r=6",
        "method.target_r=2",
        "method.tinit=1",
        "method.tfinal=1",
        steps=6,
    )
    proc = result.built.procedure
    state = proc.state()
    assert state["adalora_allocator_calls"] == 6
    ranks = state["adalora_ranks"]
    assert len(ranks) == 4
    assert sum(ranks.values()) == 4 * 2  # the target budget
    assert min(ranks.values()) < 6  # ranks changed from init_r
    pattern = result.built.model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(m) for m in pattern.values()) == 8
    saved = json.loads(json.dumps(proc.state_dict()))  # what a checkpoint holds
    assert sum(sum(m) for m in saved["rank_pattern"].values()) == 8 and saved["calls"] == 6
    # resume: loading the saved state into a fresh build re-applies the rank mask
    _, spec, loaded, _, ctx = build(
        "adalora",
        sst2_dir,
        tmp_path,
        "train.max_steps=6",
        "method.init_r=6",
        "method.target_r=2",
        "method.tinit=1",
        "method.tfinal=1",
    )
    built = apply_method(loaded.model, spec, ctx)
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if ".lora_E." in n:
                p.fill_(1.0)  # all triplets alive before the state is loaded
    built.procedure.load_state_dict(saved)
    assert built.procedure.state()["adalora_ranks"] == ranks


# -- save / load and merge round trips -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "vera", "randlora", "bone", "adalora", "pissa"])
def test_saved_trainable_tensors_reproduce_the_logits(method, stepped, sst2_dir: Path, tmp_path: Path):
    result = stepped(method)
    model = result.built.model
    path = tmp_path / "adapter.safetensors"
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))
    _, spec, loaded, loader, ctx = build(method, sst2_dir, tmp_path)  # same seed: same base and init
    fresh = apply_method(loaded.model, spec, ctx).model
    batch = _first_batch(loader)
    assert not torch.allclose(_logits(fresh, batch), _logits(model, batch), atol=1e-6, rtol=0), "no change"
    _, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected
    torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_weights_give_the_unmerged_logits(method, stepped):
    result = stepped(method)
    model = result.built.model
    batch = next(result.ctx.calibration_batches())
    unmerged = _logits(model, batch)
    merged_model = copy.deepcopy(model).merge_and_unload()
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(_logits(merged_model, batch), unmerged, atol=1e-5, rtol=1e-5)


# -- CUDA-only presets ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only validation error")
@pytest.mark.parametrize("method", ["qlora", "loftq"])
def test_cuda_only_presets_fail_validation_without_cuda(method):
    raw = PRESETS[method]
    assert raw["requires_cuda"] is True  # what the method matrix skips on
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve_method(raw)


def test_lorafa_refuses_a_trainable_a(sst2_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="freeze_a"):
        one_step("lorafa", sst2_dir, tmp_path, "method.freeze_a=false")


# -- intruder dimensions --------------------------------------------------------------------------------
def _with_intruders(n_intruders: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (64 x 16) spans a 16-dim column space; W adds ``n_intruders`` strong directions from its
    orthogonal complement (cos = 0 with every W0 singular vector) and re-weights W0's own ones."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    inside, outside = q[:, :16], q[:, 16:]
    v = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    s0 = torch.linspace(10, 1, 16)
    w0 = inside @ torch.diag(s0) @ v.T
    w = inside @ torch.diag(s0 * 1.1) @ v.T  # same directions, new scale: not intruders
    for j in range(n_intruders):
        w = w + (20.0 + j) * outside[:, j : j + 1] @ v[:, j : j + 1].T
    return w0, w


@pytest.mark.parametrize("n", [0, 1, 3])
def test_intruder_count_on_constructed_matrices(n):
    w0, w = _with_intruders(n)
    assert intruder_count(w0, w) == n
    assert intruder_count(w0, w0) == 0
    # a slight rotation inside W0's column space stays similar (cos > 0.5): no intruder
    noise = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    assert intruder_count(w0, w0 + 0.01 * noise) == 0


def test_intruder_top_k_and_epsilon():
    w0, w = _with_intruders(3)
    assert intruder_count(w0, w, top_k=2) == 2  # the intruders are the top singular directions
    assert intruder_count(w0, w, epsilon=0.0) == 0  # nothing is below |cos| 0


def test_model_intruders_per_layer_and_total():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(16, 64))
    w0a, wa = _with_intruders(2, seed=0)
    w0b, _ = _with_intruders(0, seed=1)
    with torch.no_grad():
        model[0].weight.copy_(w0a)
        model[2].weight.copy_(w0b)
    pre = snapshot(model)
    with torch.no_grad():
        model[0].weight.copy_(wa)
    report = model_intruders(pre, model)
    assert report.per_layer == {"0.weight": 2, "2.weight": 0}
    assert report.total == 2 and report.as_dict()["intruders_total"] == 2


def test_model_intruders_on_a_peft_model_uses_base_names(sst2_dir: Path, tmp_path: Path):
    _, spec, loaded, _, ctx = build("lora", sst2_dir, tmp_path)
    pre = snapshot(loaded.model, ctx.target_modules)
    model = apply_method(loaded.model, spec, ctx).model
    report = model_intruders(pre, model)  # B = 0 at init: merged == pretrained
    assert set(report.per_layer) == set(pre) and len(pre) == 4 and not report.skipped
    assert report.total == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("method", ["qlora", "loftq"])
def test_cuda_only_presets_take_a_step(method, sst2_dir: Path, tmp_path: Path):
    """Not run in CI without a GPU: one step on the 4-bit (qlora) or LoftQ-initialised base."""
    _, spec, loaded, loader, ctx = build(method, sst2_dir, tmp_path)
    built = apply_method(loaded.model, spec, ctx)
    model = built.model.cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = {k: v.cuda() for k, v in _first_batch(loader).items()}
    loss = model(**batch).loss
    loss.backward()
    built.optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
