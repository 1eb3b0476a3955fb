"""protocol=compressed: EoRA and SVD compensation against the authors' code (NVlabs/EoRA), the
compressors' formats by hand (HQQ's packed bytes, magnitude and 2:4 masks), the compensation written
into a peft LoRA exactly, the CLI end to end on a tiny BERT, and the config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorabench.compression import COMPENSATIONS, COMPRESSORS
from lorabench.compression.compensation import eora_factors, svd_factors
from lorabench.compression.compressors import hqq_quantize, magnitude_prune, n_of_m_mask, semi_structured_prune
from lorabench.config import CompressedConfig
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.protocols.compressed import protocol as compressed
from lorabench.results.record import validate_record
from lorabench.validate import validate_config
from tests.parity_case import load_fixture
from tests.parity_eora_case import RANK, SEQUENCES, build
from tests.test_continual import glue, only_record, train  # noqa: F401  (glue: the GLUE-format fixture)

PRODUCT_TOL = 1e-5  # |ours - reference| of B A relative to the largest |B A| entry (float32 SVDs)
FACTOR_TOL = 1e-4  # the factors themselves, columns sign-aligned (our A takes an equal, stabler form)
BF16_TOL = 2**-7  # two bf16 rounding steps of the largest entry (WeLore's reference casts its factors)


def settings(**kw) -> CompressedConfig:
    return CompressedConfig(**kw)


# -- parity with NVlabs/EoRA ------------------------------------------------------------------------
def our_factors(rule: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our compensation of the parity case: moments from lorabench's hooks over batches of two
    sequences (the running update crosses batch rows), factors from lorabench's rule."""
    model, ids, compressed_weights = build()
    block = model.model.layers[0]
    layers = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    batches = [{"input_ids": ids[i : i + 2]} for i in range(0, SEQUENCES, 2)]
    moments = compressed.input_moments(model, layers, batches)
    out = {}
    for name, m in layers.items():
        delta = m.weight.detach() - compressed_weights[f"model.layers.0.{name}"]
        fn = eora_factors if rule == "eora" else svd_factors
        out[name] = fn(delta, moments[name], RANK)
    return out


def relative_gap(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).abs().max() / ref.abs().max())


def sign_aligned(b: torch.Tensor, a: torch.Tensor, ref_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    signs = torch.sign((b.double() * ref_b).sum(0))
    return b.double() * signs, a.double() * signs[:, None]


@pytest.mark.parametrize("rule", ["eora", "svd"])
def test_compensation_matches_the_authors_code(rule):
    fixture = load_fixture("eora")
    assert fixture["rank"] == RANK and fixture["sequences"] == SEQUENCES
    reference = fixture["cases"][rule]["factors"]
    ours = our_factors(rule)
    assert sorted(ours) == sorted(reference)
    for name, (b, a) in ours.items():
        ref_b, ref_a = (torch.tensor(reference[name][k], dtype=torch.float64) for k in "BA")
        assert relative_gap(b @ a, ref_b @ ref_a) < PRODUCT_TOL, name
        b, a = sign_aligned(b, a, ref_b)
        assert relative_gap(b, ref_b) < FACTOR_TOL and relative_gap(a, ref_a) < FACTOR_TOL, name


def test_the_comparison_can_fail():
    """A compensation blind to the inputs (SVD) misses EoRA's reference by far more than the
    tolerance, and so do equal-weight second moments (the reference's running update weighs later
    sequences more): the test tells the rules apart."""
    reference = load_fixture("eora")["cases"]["eora"]["factors"]
    svd = our_factors("svd")
    gaps = [
        relative_gap(b @ a, torch.tensor(reference[n]["B"]).double() @ torch.tensor(reference[n]["A"]).double())
        for n, (b, a) in svd.items()
    ]
    assert min(gaps) > 100 * PRODUCT_TOL
    model, ids, compressed_weights = build()
    layers = {n: m for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}
    inputs = {}

    def keep(name):
        def hook(_module, inp, _out):
            inputs[name] = inp[0]  # returns None: the output stays

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    name = "self_attn.q_proj"
    x = inputs[name].reshape(-1, inputs[name].shape[-1]).double()
    delta = layers[name].weight.detach() - compressed_weights[f"model.layers.0.{name}"]
    b, a = eora_factors(delta, x.T @ x, RANK)
    ref = torch.tensor(reference[name]["B"]).double() @ torch.tensor(reference[name]["A"]).double()
    assert relative_gap(b @ a, ref) > 10 * PRODUCT_TOL


def test_eora_lowers_the_output_error_on_its_calibration_inputs_below_svd():
    torch.manual_seed(0)
    delta, x = torch.randn(30, 20), torch.randn(200, 20) @ torch.randn(20, 20)
    errors = {}
    for name, fn in (("svd", svd_factors), ("eora", eora_factors)):
        b, a = fn(delta, (x.T @ x).double(), 5)
        errors[name] = float(((delta - b @ a) @ x.T).norm())
    assert errors["eora"] < errors["svd"] < float((delta @ x.T).norm())


def test_eora_is_stable_with_fewer_calibration_tokens_than_inputs():
    """Singular moments (8 tokens, 40 inputs): B A stays a projection of ΔW (‖ΔW - B A‖ ≤ ‖ΔW‖)."""
    torch.manual_seed(0)
    delta, x = torch.randn(30, 40), torch.randn(8, 40)
    b, a = eora_factors(delta, (x.T @ x).double(), 6)
    assert float((delta - b @ a).norm()) <= float(delta.norm()) * (1 + 1e-5)
    residual = (delta - b @ a) @ x.T
    assert float(residual.norm()) < float((delta @ x.T).norm())


# -- the compressors --------------------------------------------------------------------------------
def linear(out_features=48, in_features=64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_hqq_packs_four_bits_and_the_module_computes_with_the_dequantized_weight():
    lin = linear()
    w, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    result = hqq_quantize(lin, settings(bits=4, group_size=16))
    groups = w.numel() // 16
    assert result.stored_bytes == w.numel() // 2 + 2 * groups * 4  # two codes per byte + fp32 scale and zero
    error = float((result.weight - w).norm() / w.norm())
    assert 0.01 < error < 0.15  # really quantized, and close
    x = torch.randn(3, 64)
    assert torch.allclose(result.module(x), nn.functional.linear(x, result.weight, bias), atol=1e-5)
    two = hqq_quantize(linear(), settings(bits=2, group_size=16))
    assert float((two.weight - w).norm() / w.norm()) > error  # fewer bits, larger error


def test_magnitude_pruning_zeroes_the_smallest_share():
    lin = linear()
    w = lin.weight.detach().clone()
    result = magnitude_prune(lin, settings(sparsity=0.75))
    kept = result.weight != 0
    assert int(kept.sum()) == w.numel() // 4
    assert w.abs()[kept].min() >= w.abs()[~kept].max()
    assert torch.equal(result.weight[kept], w[kept]) and not hasattr(lin, "weight_orig")  # permanent
    assert result.stored_bytes == w.numel() // 4 * 4 + math.ceil(w.numel() / 8)


def test_two_of_four_keeps_the_two_largest_of_every_group():
    lin = linear()
    w = lin.weight.detach().clone()
    result = semi_structured_prune(lin, settings(n_of_m=[2, 4]))
    groups, original = result.weight.reshape(48, 16, 4), w.abs().reshape(48, 16, 4)
    assert torch.equal((groups != 0).sum(-1), torch.full((48, 16), 2))
    kept = groups != 0
    assert torch.all(original.masked_fill(~kept, float("inf")).amin(-1) >= original.masked_fill(kept, -1).amax(-1))
    assert result.stored_bytes == w.numel() // 2 * 4 + w.numel() // 2 * 2 // 8
    with pytest.raises(ValueError, match="multiple of 4"):
        n_of_m_mask(torch.randn(3, 6), 2, 4)


def test_registries_match_the_config_choices():
    assert tuple(COMPRESSORS.names()) == tuple(sorted(CompressedConfig.COMPRESSORS))
    assert tuple(COMPENSATIONS.names()) == tuple(sorted(CompressedConfig.COMPENSATIONS))


# -- the compensation in a peft LoRA ----------------------------------------------------------------
def test_the_compensation_is_written_so_that_s_b_a_equals_it():
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = hqq_quantize(linear(), settings(bits=4, group_size=16)).module

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(One(), LoraConfig(r=8, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0))
    b, a = torch.randn(48, 8), torch.randn(8, 64)
    compressed.load_compensation(model, {"proj": (b, a)})
    layer = model.base_model.model.proj
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert torch.allclose(product, b @ a, atol=1e-5)
    x = torch.randn(2, 64)
    expected = nn.functional.linear(x, layer.get_base_layer().dequantize() + b @ a, layer.get_base_layer().bias)
    assert torch.allclose(model(x), expected, atol=1e-4)
    with pytest.raises(RuntimeError, match="0 of the 1 compensated layers"):
        compressed.load_compensation(model, {"other": (b, a)})


def test_layer_selection_and_peft_target_matching():
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"q": nn.Linear(2, 2)})]), "head": nn.Linear(2, 2)})
    assert list(compressed.compressed_layers(model, CompressedConfig().modules)) == ["layers.0.q"]
    assert compressed.targeted("layers.0.q", ["q"]) and not compressed.targeted("layers.0.q", ["k", "0.qq"])
    with pytest.raises(RuntimeError, match="matches no nn.Linear"):
        compressed.compressed_layers(model, "nothing")


# -- the CLI end to end -----------------------------------------------------------------------------
def compressed_args(folder, results, *extra: str) -> list[str]:
    return [
        "protocol=compressed",
        "model=tiny_bert",
        "method=lora",
        "dataset=sst2",
        f"dataset.data_dir={folder}",
        "dataset.max_length=32",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "hardware.micro_batch_size=4",
        "train.init_batches=4",
        "model.target_modules=[query,key,value,dense]",
        f"results_dir={results}",
        "progress=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "compressor,compensation",
    [("hqq", "eora"), ("semi_structured", "svd"), ("magnitude", "none"), ("hqq", "eora_bf16")],
)
def test_compressed_cli_run_records_sizes_and_errors(glue, tmp_path, compressor, compensation):  # noqa: F811
    """Each compressor, with a compensation each; HQQ also under bf16 autocast, where its layers
    dequantize to bf16 (scales and zeros stored in bf16: 4.5 bits per weight at group 64) and
    training, evaluation and the calibration passes meet float32 and bf16 operands."""
    bf16 = compensation.endswith("_bf16")
    compensation = compensation.removesuffix("_bf16")
    extra = (f"protocol.compressed.compressor={compressor}", f"protocol.compressed.compensation={compensation}")
    extra += ("hardware.mixed_precision=bf16",) if bf16 else ()
    code = train(*compressed_args(glue["sst2"], tmp_path, *extra))
    assert code == 0
    run_dir, record = only_record(tmp_path)
    assert validate_record(record) is None and record["status"] == "completed"
    assert record["run_id"].startswith("lora-compressed-sst2-tiny_bert-s0-")
    report = record["protocol_report"]
    assert report["compressor"] == compressor and report["compensation"] == compensation
    layers = report["layers"]["compressed"]
    assert layers == len(report["per_layer"]) > 0 and all(".layer." in n for n in report["per_layer"])
    expected_bits = {
        "hqq": 4 + 2 * (16 if bf16 else 32) / 64,
        "semi_structured": 32 / 2 + 2 / 2,
        "magnitude": 32 / 2 + 1,
    }
    assert report["bits_per_weight"] == pytest.approx(expected_bits[compressor], rel=1e-6)
    assert report["compressed_bytes"] < report["dense_bytes"]
    assert 0 < report["weight_error"]["mean"] <= report["weight_error"]["max"]
    errors = report["output_error"]
    if compensation == "none":
        assert report["layers"]["compensated"] == 0 and errors["compensated"] == errors["compressed"]
    else:
        assert report["layers"]["compensated"] == layers  # every compressed layer is a LoRA target here
        assert errors["compensated"] < errors["compressed"]
    assert record["progress"]["step"] == 2 and "accuracy" in record["metrics"]["final"]

    from lorabench.results.protocol_table import build_protocol_rows
    from lorabench.results.table import collect

    table, note = build_protocol_rows(collect(tmp_path, protocol="compressed")[0], "compressed")
    (row,) = table.values
    assert row["bits/weight"]["mean"] == pytest.approx(report["bits_per_weight"])
    assert row["compensated error"]["mean"] == pytest.approx(errors["compensated"])
    assert row["final"]["mean"] == pytest.approx(100 * record["metrics"]["final"]["accuracy"])
    assert "bits/weight" in note

    from lorabench.export import ExportError, load_run_model

    with pytest.raises(ExportError, match="compressed base"):  # a float-base rebuild would not be what was scored
        load_run_model(run_dir)


# -- config errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["protocol.compressed.compressor=gptq"], "protocol.compressed.compressor='gptq'.*hqq, magnitude"),
        (["protocol.compressed.compensation=corda"], "protocol.compressed.compensation='corda'.*eora, loftq"),
        (["protocol.compressed.bits=5"], "protocol.compressed.bits=5"),
        (["protocol.compressed.sparsity=1.0"], "sparsity=1.0 is invalid; it must be in \\(0, 1\\)"),
        (["protocol.compressed.n_of_m=[4,2]"], "n_of_m=\\[4, 2\\] is invalid"),
        (["protocol.compressed.modules='x[0-'"], "is not a regular expression"),
        (["method=dora"], "method 'dora' has DoRA \\(use_dora=true\\)"),
        (["method=vera"], "method 'vera' has adapter 'vera'"),
        (["method=pissa"], "method 'pissa' has init 'pissa'"),
        (["method=qlora"], "method 'qlora' has init 'nf4'"),
        (["protocol.compressed.bit_budget=3", "protocol.compressed.compressor=magnitude"], "needs compressor=hqq"),
        (["protocol.compressed.bit_budget=3", "protocol.compressed.bit_choices=[2,5]"], "bit_choices entry"),
        (["protocol.compressed.iterations=0"], "protocol.compressed.iterations"),
        (["protocol.compressed.recover=true", "protocol.compressed.compensation=eora"], "count that error twice"),
        (["method=full"], "method 'full' has adapter 'none'.*compressor=welore with method=full"),
        (["method=full", "protocol.compressed.compressor=welore", "protocol.compressed.recover=true"], "no LoRA"),
        (["method=lora", "protocol.compressed.compressor=welore"], "adds adapter 'lora'; use an adapter-free"),
        (["method=full", "protocol.compressed.compressor=welore", "protocol.compressed.compensation=svd"], "has none"),
        (["protocol.compressed.welore_reduction=0"], "welore_reduction=0.0 is invalid"),
    ],
)
def test_compressed_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose(["protocol=compressed", "model=tiny_bert", "dataset=sst2", *overrides]))


def test_compressed_config_defaults():
    cfg = validate_config(compose(["protocol=compressed", "model=minilm_l6", "dataset=sst2", "method=lora"]))
    c = cfg.protocol.compressed
    assert (c.compressor, c.bits, c.group_size, c.compensation) == ("hqq", 4, 64, "none")
    assert c.modules == CompressedConfig().modules


# -- LQ-LoRA: the alternation and the ILP against HanGuo97/lq-lora ----------------------------------
def rounding_compressor(w: torch.Tensor):
    from lorabench.compression.compressors import Compressed
    from tests.parity_lq_lora_case import round_rows

    return Compressed(nn.Identity(), round_rows(w), 0)


def test_lq_decomposition_matches_the_authors_code():
    from lorabench.compression.compensation import lq_decompose
    from tests.parity_lq_lora_case import DECOMPOSITIONS, weights

    fixture = load_fixture("lq_lora")["cases"]["decompositions"]
    assert sorted(fixture) == sorted(DECOMPOSITIONS)
    ran = set()
    for name, (rank, cap) in DECOMPOSITIONS.items():
        for w, ref in zip(weights(), fixture[name]["matrices"]):
            result, (b, a), done, _ = lq_decompose(w, rounding_compressor, rank, cap)
            ran.add(done)
            ref_l = torch.tensor(ref["L1"], dtype=torch.float64) @ torch.tensor(ref["L2"], dtype=torch.float64)
            assert relative_gap(b @ a, ref_l) < PRODUCT_TOL, name
            assert relative_gap(result.weight, torch.tensor(ref["Q"], dtype=torch.float64)) < PRODUCT_TOL, name
    assert min(ran) == 2 and max(ran) > 2  # the cap and the stop rule both decide somewhere


def test_lq_comparison_can_fail():
    """Returning the iterate before the error rose (instead of the one that raised it, as the
    reference does) misses the reference on the matrices where the stop rule fired."""
    from lorabench.compression.compensation import svd_factors
    from tests.parity_lq_lora_case import round_rows, weights

    fixture = load_fixture("lq_lora")["cases"]["decompositions"]["rank2_cap100"]["matrices"]
    gaps = []
    for w, ref in zip(weights(), fixture):
        q, last = torch.zeros_like(w), float("inf")
        for _ in range(100):
            b, a = svd_factors(w - q, None, 2)
            new_q = round_rows(w - b @ a)
            error = float((w - b @ a - new_q).norm())
            if error > last:
                break
            last, q = error, new_q
        gaps.append(relative_gap(q, torch.tensor(ref["Q"], dtype=torch.float64)))
    assert max(gaps) > 100 * PRODUCT_TOL


def test_bit_allocation_matches_the_authors_ilp():
    from lorabench.compression.allocation import solve_assignment
    from tests.parity_lq_lora_case import ilp_case

    costs, storage, budgets = ilp_case()
    reference = load_fixture("lq_lora")["cases"]["ilp"]
    chosen = []
    for budget, ref in zip(budgets, reference["assignments"]):
        x = solve_assignment(costs, storage, budget)
        assert (x.sum(1) == 1).all() and (x * storage).sum() <= budget
        assert x.tolist() == ref
        chosen.append(tuple(x.argmax(1)))
    assert len(set(chosen)) == len(budgets)  # the budgets give different allocations
    with pytest.raises(ValueError, match="below the"):
        solve_assignment(costs, storage, storage.min(1).sum() - 1)


def test_lq_lora_run_with_a_bit_budget(glue, tmp_path):  # noqa: F811
    extra = ("protocol.compressed.compensation=lq_lora", "protocol.compressed.bit_budget=3.5", "train.max_steps=0")
    assert train(*compressed_args(glue["sst2"], tmp_path, *extra)) == 0
    _, record = only_record(tmp_path)
    report = record["protocol_report"]
    alloc = report["allocation"]
    assert alloc["bit_budget"] == 3.5 and alloc["bits_per_weight"] <= 3.5
    assert sum(alloc["layers_by_bits"].values()) == report["layers"]["compressed"]
    assert {v["bits"] for v in report["per_layer"].values()} <= {2, 3, 4, 8}
    assert all(v["alternations"] >= 1 for v in report["per_layer"].values())
    errors = report["output_error"]
    assert errors["compensated"] < errors["compressed"]
    assert report["settings"]["iterations"] == 100 and report["settings"]["bit_choices"] == [2, 3, 4, 8]


# -- WeLore ----------------------------------------------------------------------------------------
def test_welore_cli_run_trains_only_the_low_rank_factors(glue, tmp_path):  # noqa: F811
    extra = (
        "method=full",
        "protocol.compressed.compressor=welore",
        "protocol.compressed.welore_reduction=0.6",
    )
    args = [a for a in compressed_args(glue["sst2"], tmp_path, *extra) if a != "method=lora"]
    assert train(*args) == 0
    _, record = only_record(tmp_path)
    assert record["status"] == "completed"
    report = record["protocol_report"]
    lrc = {n: v for n, v in report["per_layer"].items() if v["keep_rank"] is not None}
    assert report["low_rank"] == {"layers": len(lrc), "dense_layers": len(report["per_layer"]) - len(lrc)}
    assert 0 < len(lrc)
    for v in lrc.values():
        assert v["stored_bytes"] < v["dense_bytes"] and v["weight_error"] > 0
    cost = record["cost"]
    assert cost["trainable_params"] == cost["expected_trainable_params"] < cost["total_params"]


def welore_layers():
    from tests.parity_welore_case import weights

    layers = {}
    for i, w in enumerate(weights()):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layers[f"m{i}"] = lin
    return layers


def test_welore_ranks_and_factors_match_the_authors_code():
    from lorabench.compression.compressors import normalised_spectra, pruned_ranks, welore_factorize
    from tests.parity_welore_case import MIN_RATIO, THRESHOLDS

    fixture = load_fixture("welore")
    assert fixture["min_ratio"] == MIN_RATIO and sorted(fixture["cases"]) == sorted(map(str, THRESHOLDS))
    layers = welore_layers()
    spectra = normalised_spectra(layers)
    low_rank_seen = 0
    for tau in THRESHOLDS:
        reference = fixture["cases"][str(tau)]
        counts = pruned_ranks(spectra, tau)
        assert counts == {n: reference[n]["pruned"] for n in layers}
        for name, lin in layers.items():
            full = min(lin.weight.shape)
            assert (counts[name] / full > MIN_RATIO) == reference[name]["low_rank"]
            if not reference[name]["low_rank"]:
                continue
            low_rank_seen += 1
            result = welore_factorize(lin, settings(), keep_rank=full - counts[name])
            ref_up, ref_down = (torch.tensor(reference[name][k], dtype=torch.float64) for k in ("up", "down"))
            up, down = (w.detach().to(torch.bfloat16) for w in (result.module.up.weight, result.module.down.weight))
            up, down = sign_aligned(up, down, ref_up)  # the reference keeps bf16 factors: so do we, to compare
            assert relative_gap(up, ref_up) < BF16_TOL and relative_gap(down, ref_down) < BF16_TOL, (tau, name)
    assert 0 < low_rank_seen < len(THRESHOLDS) * len(layers)  # both kinds of matrices occur


def test_welore_comparison_can_fail():
    """Normalising by the largest singular value only (no min subtraction) prunes other counts."""
    from lorabench.compression.compressors import pruned_ranks

    fixture = load_fixture("welore")["cases"]
    spectra = {n: torch.linalg.svdvals(m.weight.detach()) for n, m in welore_layers().items()}
    wrong = pruned_ranks({n: s / s.max() for n, s in spectra.items()}, 0.3)
    assert wrong != {n: fixture["0.3"][n]["pruned"] for n in spectra}
    name, entry = next((n, e) for n, e in fixture["0.3"].items() if e["low_rank"])
    keep = len(entry["up"][0])
    u, s, _ = torch.linalg.svd(welore_layers()[name].weight.detach(), full_matrices=False)
    ref_up = torch.tensor(entry["up"], dtype=torch.float64)
    whole = u[:, :keep] * s[:keep]  # all of Σ in the up factor instead of Σ^½ in each
    signs = torch.sign((whole.double() * ref_up).sum(0))
    assert relative_gap(whole.double() * signs, ref_up) > 10 * BF16_TOL


def test_welore_threshold_reaches_the_target_reduction():
    from lorabench.compression.compressors import normalised_spectra, pruned_ranks, welore_threshold

    spectra = normalised_spectra(welore_layers())
    total = sum(s.numel() for s in spectra.values())
    for target in (0.2, 0.5, 0.8):
        tau = welore_threshold(spectra, target)
        assert sum(pruned_ranks(spectra, tau).values()) / total >= target
        assert sum(pruned_ranks(spectra, tau - 1e-9).values()) / total < target + 1 / total


# -- LoRAM's recovery --------------------------------------------------------------------------------
def test_recovery_puts_the_trained_lora_on_the_original_weights():
    from peft import LoraConfig, get_peft_model

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = linear(48, 64, seed=1), linear(64, 48, seed=2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Two()
    originals = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in (("a", model.a), ("b", model.b))}
    model.a = hqq_quantize(model.a, settings(bits=4, group_size=16)).module
    magnitude_prune(model.b, settings(sparsity=0.5))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["a"], lora_dropout=0.0))
    layer = peft_model.base_model.model.a
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    compressed.restore_weights(peft_model, originals)
    x = torch.randn(3, 64)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    hidden = torch.tanh(nn.functional.linear(x, originals["a"][0] + delta, originals["a"][1]))
    expected = nn.functional.linear(hidden, *originals["b"])
    assert torch.allclose(peft_model(x), expected, atol=1e-5)
    assert type(layer.base_layer) is nn.Linear and not layer.base_layer.weight.requires_grad
    with pytest.raises(RuntimeError, match="1 compressed layers were not found"):
        compressed.restore_weights(peft_model, {**originals, "c": originals["a"]})


def test_loram_run_scores_before_and_after_recovery(glue, tmp_path):  # noqa: F811
    extra = ("protocol.compressed.compressor=semi_structured", "protocol.compressed.recover=true")
    assert train(*compressed_args(glue["sst2"], tmp_path, *extra)) == 0
    _, record = only_record(tmp_path)
    report = record["protocol_report"]
    assert report["recovered"] is True and "accuracy" in report["before_recovery"]
    assert report["settings"]["recover"] is True


# -- LoftQ: the alternation against peft's loftq_init ------------------------------------------------
def test_loftq_decomposition_matches_peft():
    from lorabench.compression.compensation import loftq_decompose
    from tests.parity_lq_lora_case import weights

    fixture = load_fixture("loftq")["cases"]
    for name, case in fixture.items():
        for w, ref in zip(weights(), case["matrices"]):
            result, (b, a), done, _ = loftq_decompose(w, rounding_compressor, case["rank"], case["iterations"])
            assert done == case["iterations"]
            ref_ba = torch.tensor(ref["B"], dtype=torch.float64) @ torch.tensor(ref["A"], dtype=torch.float64)
            assert relative_gap(b @ a, ref_ba) < PRODUCT_TOL, name
            assert relative_gap(result.weight, torch.tensor(ref["Q"], dtype=torch.float64)) < PRODUCT_TOL, name


def test_loftq_and_lq_lora_orders_differ():
    """LQ-LoRA's order (SVD first) misses LoftQ's reference: the comparison tells them apart."""
    from lorabench.compression.compensation import lq_decompose
    from tests.parity_lq_lora_case import weights

    case = load_fixture("loftq")["cases"]["rank4_iter1"]
    w, ref = weights()[0], case["matrices"][0]
    result, (b, a), _, _ = lq_decompose(w, rounding_compressor, 4, 1)
    assert relative_gap(result.weight, torch.tensor(ref["Q"], dtype=torch.float64)) > 100 * PRODUCT_TOL


def test_loftq_run(glue, tmp_path):  # noqa: F811
    extra = ("protocol.compressed.compensation=loftq", "protocol.compressed.loftq_iterations=2", "train.max_steps=0")
    assert train(*compressed_args(glue["sst2"], tmp_path, *extra)) == 0
    _, record = only_record(tmp_path)
    report = record["protocol_report"]
    assert all(v["alternations"] == 2 for v in report["per_layer"].values())
    assert report["output_error"]["compensated"] < report["output_error"]["compressed"]
    assert report["settings"]["loftq_iterations"] == 2


def test_the_compressed_leaderboard_rows_are_valid_configs(tmp_path):
    """Every row of scripts/protocol_leaderboard.py's compressed track composes and validates."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "protocol_leaderboard.py"
    spec = importlib.util.spec_from_file_location("protocol_leaderboard", path)
    board = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(board)
    for row in board.COMPRESSED:
        args = [a for a in board.overrides("compressed", row, 0, tmp_path) if not a.startswith("dataset.data_dir=")]
        cfg = validate_config(compose(args))
        assert cfg.protocol.name == "compressed" and cfg.train.max_steps == 250, row
