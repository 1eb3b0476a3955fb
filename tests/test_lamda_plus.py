"""LaMDA++ (``method=lamda_plus``: the ``lamda`` adapter with ``rank_allocation: spectrum``): the
spectrum-energy rank allocation (exact values on weights with known spectra, budget, min rank, caps),
exact closed-form trainable count with mixed ranks, step-0 identity, what one step moves, the
authors' PMB freezing per layer rank, save/load, and the per-layer ranks in the run record. The
default (``method=lamda``) is uniform with the authors' released init."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lorabench.errors import ConfigError
from lorabench.methods.adapters.lamda import allocate_ranks, layer_ranks, residual_energy
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable, target_shapes
from lorabench.methods.base import head_parameter_count
from lorabench.methods.build import apply_method, expected_trainable
from tests.conftest import compose, tiny_overrides
from tests.method_harness import build, train_with_procedure

D = 32  # tiny_bert's hidden size: query/value are 32 x 32
# targets in module order: layer.0 query, layer.0 value, layer.1 query, layer.1 value
SPECTRA = [
    [1.0] * 32,  # flat: top-4 energy 4/32, residual 0.875
    [2.0] * 8 + [0.0] * 24,  # residual 0.5
    [3.0] * 5 + [0.0] * 27,  # residual 0.2
    [5.0, 4.0, 3.0, 2.0] + [0.0] * 28,  # rank 4: residual 0
]
# budget 4 x 4 = 16; 1 each + 12 shared by 0.875 : 0.5 : 0.2 : 0 -> 7.67, 4.81, 2.52, 1
# -> floors 7, 4, 2, 1 (14); the 2 left go to the largest fractions (.81, .67) -> 8, 5, 2, 1
EXPECTED = [8, 5, 2, 1]


def known_weight(svals: list[float], d: int = D, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (u @ torch.diag(torch.tensor(svals, dtype=torch.float64)) @ v.T).float()


def set_spectra(model) -> list[str]:
    names = [name for name, _, _ in target_shapes(model, ["query", "value"])]
    assert len(names) == len(SPECTRA)
    with torch.no_grad():
        for k, (name, svals) in enumerate(zip(names, SPECTRA)):
            model.get_submodule(name).weight.copy_(known_weight(svals, seed=k))
    return names


def make_plus(sst2_dir: Path, tmp: Path, *extra: str, method: str = "lamda_plus"):
    """(base copy, built method, batch, spec, ctx, target names) with the known spectra in W0."""
    _, spec, loaded, loader, ctx = build(method, sst2_dir, tmp, "method.rank=4", *extra)
    names = set_spectra(loaded.model)
    base = copy.deepcopy(loaded.model).eval()
    expected = expected_trainable(base, spec, ctx)
    built = apply_method(loaded.model, spec, ctx)
    return base, built, next(iter(loader)), spec, ctx, names, expected


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# -- the allocation rule -------------------------------------------------------------------------


def test_residual_energy_of_known_spectra():
    for svals, rho in zip(SPECTRA, [0.875, 0.5, 0.2, 0.0]):
        sv = torch.linalg.svdvals(known_weight(svals))
        assert residual_energy(sv, 4) == pytest.approx(rho, abs=1e-5)
    assert residual_energy(torch.zeros(5), 2) == 0.0


def test_allocation_exact_values_and_budget():
    residuals = [residual_energy(torch.linalg.svdvals(known_weight(s)), 4) for s in SPECTRA]
    ranks = allocate_ranks(residuals, 4, [D] * 4)
    assert ranks == EXPECTED and sum(ranks) == 16
    # flatter spectrum (more energy outside the top-r) -> strictly more rank
    order = sorted(range(4), key=lambda i: residuals[i])
    assert [ranks[i] for i in order] == sorted(ranks) and len(set(ranks)) == 4
    # the allocation follows the residual share, not the captured share: swapping the spectra swaps the ranks
    assert allocate_ranks(residuals[::-1], 4, [D] * 4) == EXPECTED[::-1]


def test_allocation_min_rank_caps_and_degenerate_cases():
    assert allocate_ranks([1.0, 0.0, 0.0, 0.0], 2, [16] * 4) == [5, 1, 1, 1]  # min rank 1 per layer
    assert allocate_ranks([0.0, 0.0, 0.0], 3, [8] * 3) == [3, 3, 3]  # no residual anywhere: uniform
    # cap at min(d_out, d_in): 1 + 6 x 0.9 = 6.4 > 5, the excess 1.4 goes to the other layer
    assert allocate_ranks([0.9, 0.1], 4, [5, 16]) == [5, 3]
    for residuals, rank in (([0.3, 0.2, 0.5], 7), ([0.01, 0.7, 0.29, 0.0, 0.4], 3)):
        ranks = allocate_ranks(residuals, rank, [64] * len(residuals))
        assert sum(ranks) == rank * len(residuals) and min(ranks) >= 1
    with pytest.raises(ConfigError, match="exceeds"):
        allocate_ranks([0.5, 0.5], 4, [3, 4])


def test_rank_allocation_is_validated(sst2_dir, tmp_path):
    with pytest.raises(ConfigError, match="rank_allocation"):
        build("lamda_plus", sst2_dir, tmp_path, "method.rank_allocation=bogus")


# -- the adapter on a tiny model ----------------------------------------------------------------


def test_layers_get_the_allocated_ranks_and_exact_count(sst2_dir, tmp_path):
    base, built, _, spec, ctx, names, expected = make_plus(sst2_dir, tmp_path)
    layers = adapter_layers(built.model)
    assert [layers[n].lora_B.shape[1] for n in names] == EXPECTED
    assert [tuple(layers[n].lora_M.shape) for n in names] == [(r, r) for r in EXPECTED]
    assert [layers[n].lora_A.shape[0] for n in names] == EXPECTED
    assert ctx.extras["lamda_layer_ranks"] == dict(zip(names, EXPECTED))
    assert ctx.extras["lamda_rank_allocation"] == "spectrum"
    count = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    formula = sum(r * D + r * r for r in EXPECTED) + head_parameter_count(base, ctx.head)
    assert count == formula == expected
    assert formula != 4 * (4 * D + 16) + head_parameter_count(base, ctx.head)  # mixed ranks do count differently


def test_step0_identity_and_one_step_moves_only_pmb_and_core(sst2_dir, tmp_path):
    base, built, batch, _, _, _, _ = make_plus(sst2_dir, tmp_path)
    model = built.model
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable if not n.startswith("classifier.")} == {"lora_B", "lora_M"}
    pma = {n: layer.lora_A.clone() for n, layer in adapter_layers(model).items()}
    model.train()
    model(**batch).loss.backward()
    built.procedure.after_backward(0)
    built.optimizer.step()
    built.optimizer.zero_grad(set_to_none=True)
    built.procedure.on_step_end(1)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable
    assert {n.rsplit(".", 1)[-1] for n in moved} >= {"lora_B", "lora_M"}
    for n, layer in adapter_layers(model).items():
        assert torch.equal(layer.lora_A, pma[n])  # PMA is frozen


def test_pmb_freezing_with_mixed_ranks(sst2_dir, tmp_path):
    """The authors' gradual_freeze_B per layer rank: t = floor(g / (eta T)) = floor(g / 2) here; PMB's
    first t columns get no gradient, and a layer with t >= r stops training (full gradient at that
    step, none after: AdamW leaves it untouched)."""
    _, built, batch, _, _, names, _ = make_plus(
        sst2_dir, tmp_path, "train.max_steps=8", "method.pmb_freeze_every=0.25", "train.weight_decay=0.1"
    )
    model, proc = built.model, built.procedure
    layers = adapter_layers(model)
    model.train()
    history = {n: [layers[n].lora_B.detach().clone()] for n in names}
    for step in range(8):
        model(**batch).loss.backward()
        proc.after_backward(step)
        t = (step + 1) // 2
        assert proc.t == t
        for n, r in zip(names, EXPECTED):
            grad = layers[n].lora_B.grad
            if t >= r and step // 2 >= r:  # stopped at an earlier step
                assert grad is None, (n, step)
            elif t >= r:  # the step it stops at keeps the whole gradient
                assert grad is not None and (grad != 0).any(dim=0).all(), (n, step)
            else:
                assert (grad[:, :t] == 0).all() and (grad[:, t:] != 0).any(dim=0).all(), (n, step)
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        proc.on_step_end(step + 1)
        for n in names:
            history[n].append(layers[n].lora_B.detach().clone())
    # ranks 8, 5, 2, 1: the rank-1 PMB stops after step 2 (g = 2), the rank-2 one after g = 4
    for n, last in zip(names, (None, None, 4, 2)):
        if last is None:  # columns without gradient still move (AdamW's momentum and weight decay)
            assert not torch.equal(history[n][-1][:, 0], history[n][2][:, 0]), n
        else:
            assert all(torch.equal(h, history[n][last]) for h in history[n][last:]), n
            assert not torch.equal(history[n][last], history[n][last - 1]), n
    state = proc.state()
    assert state["lamda_pmb_frozen_columns"] == 4 and state["lamda_rank"] == 8
    assert state["lamda_pmb_frozen_columns_per_layer"] == dict(zip(names, [4, 4, 2, 1]))
    assert state["lamda_pmb_stopped"] == names[2:]


def test_save_load_and_procedure_state_round_trip(sst2_dir, tmp_path):
    _, built, batch, _, _, _, _ = make_plus(sst2_dir, tmp_path, "train.max_steps=8", "method.pmb_freeze_every=0.25")
    model, proc = built.model, built.procedure
    train_with_procedure(built, batch, 3)
    out = logits(model, batch)
    path = tmp_path / "adapter.safetensors"
    save_trainable(model, path)
    state = json.loads(json.dumps(proc.state_dict()))
    assert state == {"t": 1}  # after g = 3: floor(3 / 2); the rule depends on the step only
    _, fresh, _, _, _, _, _ = make_plus(sst2_dir, tmp_path, "train.max_steps=8", "method.pmb_freeze_every=0.25")
    assert not torch.equal(logits(fresh.model, batch), out)
    load_trainable(fresh.model, path)
    fresh.procedure.load_state_dict(state)
    torch.testing.assert_close(logits(fresh.model, batch), out, rtol=0, atol=0)
    assert fresh.procedure.state() == proc.state() and fresh.procedure.state_dict() == state


def test_default_lamda_stays_uniform(sst2_dir, tmp_path):
    """``method=lamda`` has no rank_allocation key, keeps rank r everywhere and the authors' init."""
    cfg = compose(["method=lamda", *tiny_overrides("classification", sst2_dir, tmp_path)])
    assert "rank_allocation" not in cfg["method"]
    base, built, _, spec, ctx, names, expected = make_plus(sst2_dir, tmp_path, method="lamda")
    assert spec.params["adapter"].rank_allocation == "uniform"
    assert [adapter_layers(built.model)[n].lora_B.shape[1] for n in names] == [4] * 4
    assert built.procedure.state_dict() == {"t": 0} and "lamda_pmb_frozen_columns_per_layer" not in (
        built.procedure.state()
    )
    assert spec.params["adapter"].factor_init == "lora"
    for layer in adapter_layers(built.model).values():  # PMB = 0: the model starts at W0 without a subtraction
        assert not layer.subtract_init and layer.lora_B.abs().max() == 0
    assert expected == 4 * (4 * D + 16) + head_parameter_count(base, ctx.head)
    assert layer_ranks(base, ctx.target_modules, spec.params["adapter"]) == (dict.fromkeys(names, 4), {})


def test_run_record_reports_per_layer_ranks(sst2_dir, tmp_path):
    from lorabench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "method=lamda_plus", *tiny_overrides("classification", sst2_dir, tmp_path)])
    assert exc.value.code == 0
    (path,) = sorted(tmp_path.rglob("record.json"))
    record = json.loads(path.read_text())
    assert record["status"] == "completed" and record["run_id"].startswith("lamda_plus-")
    report = record["method_report"]
    ranks = report["lamda_layer_ranks"]
    assert report["lamda_rank_allocation"] == "spectrum" and len(ranks) == 4
    assert sum(ranks.values()) == 8 * 4 and min(ranks.values()) >= 1
    assert set(report["lamda_spectrum_residual"]) == set(ranks)
    assert record["cost"]["trainable_params"] == record["cost"]["expected_trainable_params"]
    assert record["cost"]["trainable_params"] == sum(r * D + r * r for r in ranks.values()) + 2 * D + 2


def test_causal_lm_count_with_unequal_shapes(gsm8k_dir, tmp_path):
    """tiny_llama's v_proj has d_out != d_in: the closed form still matches, the LM head stays frozen."""
    from tests.method_harness import changed, one_step

    result = one_step("lamda_plus", gsm8k_dir, tmp_path, "method.rank=4", kind="causal_lm")
    ranks = result.ctx.extras["lamda_layer_ranks"]
    assert sum(ranks.values()) == 4 * len(ranks) and min(ranks.values()) >= 1
    assert sum(result.after[n].numel() for n in result.trainable) == result.expected_trainable
    assert not any("lm_head" in n for n in result.trainable) and changed(result) <= result.trainable
