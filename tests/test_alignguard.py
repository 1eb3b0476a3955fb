"""AlignGuard-LoRA's regularizer (lorabench/methods/regularizers/alignguard.py): the split and the four
energies by hand, the Fisher directions against a dense eigendecomposition, the per-sample gradients
against autograd one sample at a time, the terms in a model against a dense reference (and their
gradients on the LoRA factors), zero terms at the start, the alignment drift before and after
training in the record's state, and the config refusals. The numbers pinned against a third party's
reading of the paper are in tests/test_parity_alignguard.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lorabench.errors import ConfigError
from lorabench.method_params.regularizers_alignguard import AlignGuardParams
from lorabench.methods.build import apply_method
from lorabench.methods.regularizers.alignguard import (
    Directions,
    hidden_gaussian_nll,
    layer_energies,
    per_sample_gradients,
    representation_probe,
    sequence_nll,
    text_probe,
    top_directions,
)
from tests.method_harness import build

TEXTS = ["The sky is blue.", "Please be kind to others.", "I cannot help with that request."]


def _built(data_dir, tmp, *extra, kind="classification", tokenizer=False):
    cfg, spec, loaded, loader, ctx = build("alignguard_lora", data_dir, tmp, *extra, kind=kind)
    if tokenizer:
        ctx.tokenizer = loaded.tokenizer  # what the loop's context carries
    built = apply_method(loaded.model, spec, ctx)
    return built, ctx


@pytest.fixture(scope="module")
def encoder(sst2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alignguard_encoder")
    return _built(sst2_dir, tmp, "method.alignguard_samples=4", "method.alignguard_top_k=2")


@pytest.fixture(scope="module")
def decoder(gsm8k_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alignguard_decoder")
    texts = tmp / "align.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    extra = [f"method.alignguard_data={texts}", "method.alignguard_max_length=8", "method.alignguard_top_k=2"]
    return _built(gsm8k_dir, tmp, *extra, "method.alignguard_samples=3", kind="causal", tokenizer=True)


def _factors(layer):
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def test_split_and_energies_by_hand():
    """u1 = E11, u2 = (E12 + E21)/sqrt2, lambda = (3, 0.5), dW = [[1, 2], [3, 4]]: c = (1, 5/sqrt2),
    dW_A = [[1, 2.5], [2.5, 0]], dW_T = [[0, -0.5], [0.5, 4]]."""
    r = 1 / math.sqrt(2)
    basis = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, r], [r, 0.0]]], dtype=torch.float64)
    directions = Directions(basis, torch.tensor([3.0, 0.5], dtype=torch.float64), 1.0)
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    e = layer_energies(delta, directions, beta=4.0, tau=0.01)
    assert e["align"].item() == pytest.approx(3 * 1 + 0.5 * 12.5)  # sum lambda c^2 (not lambda^2, not sqrt)
    assert e["task"].item() == pytest.approx(0.25 + 0.25 + 16)  # ||dW_T||^2 (||dW_A||^2 would be 13.5)

    def weight(value):
        return 1 + 4 / (1 + math.exp(-(abs(value) - 0.01)))

    assert e["overlap"].item() == pytest.approx((weight(2) * 1.25 + weight(3) * 1.25) / 4)
    assert e["geodesic"].item() == pytest.approx(0.0, abs=1e-24)  # the split is orthogonal
    first = layer_energies(delta, Directions(basis[:1], directions.eigenvalues[:1], 1.0), 4.0, 0.01)
    assert first["align"].item() == pytest.approx(3.0) and first["task"].item() == pytest.approx(29.0)


def test_top_directions_are_the_dense_fishers_top_eigenpairs():
    g = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(0))
    dense = torch.einsum("ni,nj->ij", g.reshape(7, -1), g.reshape(7, -1)).double() / 7
    values, vectors = torch.linalg.eigh(dense)
    for k in (1, 3, 5):
        d = top_directions(g, k)
        assert d.basis.shape == (k, 3, 4)
        torch.testing.assert_close(d.eigenvalues.double(), values.flip(0)[:k], rtol=1e-5, atol=1e-6)
        projector = torch.einsum("ki,kj->ij", d.basis.reshape(k, -1), d.basis.reshape(k, -1)).double()
        top = vectors[:, -k:]
        torch.testing.assert_close(projector, top @ top.T, rtol=0, atol=1e-5)
        assert d.captured == pytest.approx(float(values.flip(0)[:k].sum() / values.clamp(min=0).sum()), rel=1e-5)
    assert top_directions(g, 12).basis.shape[0] == 7  # rank <= N: null directions are dropped
    assert top_directions(torch.zeros(3, 2, 2), 2).basis.shape[0] == 0


def _one_at_a_time(model, layer, batch, loss, rows):
    weight = layer.get_base_layer().weight
    weight.requires_grad_(True)
    try:
        model.eval()
        out = []
        for i in range(rows):
            single = {k: v[i : i + 1] for k, v in batch.items()}
            (grad,) = torch.autograd.grad(loss(model, single).sum(), weight)
            out.append(grad)
        return torch.stack(out)
    finally:
        weight.requires_grad_(False)
        model.train()


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_per_sample_gradients_equal_autograd_one_sample_at_a_time(which, request):
    built, _ = request.getfixturevalue(which)
    reg, model = built.regularizer, built.model
    batch = next(iter(reg.probe.batches("cpu")))
    rows = batch["input_ids"].shape[0]
    assert rows > 1 and (batch["attention_mask"] == 0).any()  # several samples, padded
    loss = hidden_gaussian_nll if which == "encoder" else sequence_nll
    name, layer = next(iter(reg.layers.items()))
    ours = per_sample_gradients(model, {name: layer}, [batch], loss)[name]
    torch.testing.assert_close(ours, _one_at_a_time(model, layer, batch, loss, rows), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_terms_equal_a_dense_reference_and_reach_the_lora_factors(encoder):
    built, _ = encoder
    reg, p = built.regularizer, built.regularizer.params
    layers = list(reg.layers.items())
    saved = [_factors(layer)[1].detach().clone() for _, layer in layers]
    gen = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for _, layer in layers:
                b = _factors(layer)[1]
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
        terms = reg.loss_terms(built.model, {}, None)
        align = task = 0.0
        for name, layer in layers:
            a, b, s = _factors(layer)
            v = (s * b @ a).detach().reshape(-1).double()
            u = reg.directions[name].basis.reshape(len(reg.directions[name].eigenvalues), -1).double()
            fisher_a = u.T @ torch.diag(reg.directions[name].eigenvalues.double()) @ u  # F on the top directions
            rest = v - u.T @ (u @ v)
            align, task = align + v @ fisher_a @ v, task + rest @ rest
        assert terms["align"].item() == pytest.approx(p.alignguard_lambda_a * float(align), rel=1e-4)
        assert terms["task"].item() == pytest.approx(p.alignguard_lambda_t * float(task), rel=1e-4)
        assert terms["align"].item() > 0 and terms["task"].item() > 0 and terms["collision"].item() > 0
        name, layer = layers[0]
        a, b, s = _factors(layer)
        terms["align"].backward()
        d = reg.directions[name]
        coords = torch.einsum("kij,ij->k", d.basis, (s * b @ a).detach())
        expected = 2 * p.alignguard_lambda_a * s * torch.einsum("k,kij->ij", d.eigenvalues * coords, d.basis) @ a.T
        torch.testing.assert_close(b.grad, expected.detach(), rtol=1e-4, atol=1e-7)
    finally:
        with torch.no_grad():
            for (_, layer), b in zip(layers, saved):
                _factors(layer)[1].copy_(b)
        built.model.zero_grad(set_to_none=True)


def test_terms_and_their_gradients_are_zero_at_the_start(decoder):
    built, _ = decoder
    terms = built.regularizer.loss_terms(built.model, {}, None)
    assert set(terms) == {"align", "task", "collision"}
    assert all(t.item() == 0.0 for t in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in built.model.parameters())
    built.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_alignment_drift_before_and_after_training_is_in_the_state(which, request):
    built, ctx = request.getfixturevalue(which)
    reg = built.regularizer
    before = reg.state()["alignment"]["before"]
    reg.before_forward(built.model, 0)  # the loop measures it again before the first step
    assert reg.state()["alignment"]["before"] == pytest.approx(before, rel=1e-6)
    layer = next(iter(reg.layers.values()))
    b = _factors(layer)[1]
    saved = b.detach().clone()
    try:
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(2)))
        reg.on_step_end(ctx.max_steps)
        assert reg.state()["alignment"]["after"] is None  # not until the end of training
        reg.on_train_end(built.model)
        state = reg.state()
    finally:
        with torch.no_grad():
            b.copy_(saved)
    json.dumps(state)  # plain JSON for the record
    alignment = state["alignment"]
    assert alignment["after"] != pytest.approx(before)
    if which == "encoder":
        assert state["signal"] == "hidden_state" and state["source"]["kind"] == "calibration"
        assert before == 0.0 and alignment["after"] > 0 and alignment["ratio"] is None
        assert state["samples"] == 4 and state["directions"] == {"layers": 4, "total": 8, "fewest": 2}
    else:
        assert state["signal"] == "lm_nll" and state["source"]["kind"] == "file" and state["samples"] == len(TEXTS)
        assert before > 0 and alignment["ratio"] == pytest.approx(alignment["after"] / before)
    reg.after = None
    saved_state = {"before": before, "after": alignment["after"]}
    reg.load_state_dict(saved_state)  # a resumed run keeps both values
    assert reg.state_dict() == saved_state
    reg.after = None


def _without_tokenizer(ctx):
    return dataclasses.replace(ctx, tokenizer=None)


def test_sampled_texts_without_a_file(decoder, monkeypatch):
    """No file: texts sampled from the base model by the forgetting probe's sampler, with the start/end
    ids of the model's config when the context carries no tokenizer."""
    import lorabench.analysis.forgetting as forgetting

    monkeypatch.setattr(forgetting, "SAMPLE_TOKENS", 3)
    built, ctx = decoder
    probe = text_probe(built.model, AlignGuardParams(alignguard_samples=2, alignguard_top_k=1), _without_tokenizer(ctx))
    assert probe.source == {
        "kind": "sampled",
        "seed": forgetting.SAMPLE_SEED,
        "new_tokens": 3,
        "temperature": 1.0,
        "token_ids_from": "model config",
    }
    assert len(probe.sequences) == 2 and all(2 <= len(s) <= 4 for s in probe.sequences)
    assert probe.drift(built.model) > 0


def test_config_refusals(encoder, decoder, tmp_path):
    bad = {
        "alignguard_alpha": (1.5, "method.alignguard_alpha=1.5 is invalid; it must be in \\[0, 1\\]"),
        "alignguard_lambda_a": (-1.0, "method.alignguard_lambda_a=-1.0 is invalid"),
        "alignguard_top_k": (40, "method.alignguard_top_k=40 is invalid for method.alignguard_samples=32"),
        "alignguard_data": ("texts.csv", "method.alignguard_data='texts.csv' is invalid; valid choices"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            AlignGuardParams(**{key: value})
    with pytest.raises(ConfigError, match="does not exist"):
        AlignGuardParams(alignguard_data=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="method.use_dora=true is invalid with method.regularizer='alignguard'"):
        AlignGuardParams().check_adapter(type("Lora", (), {"use_dora": True})())
    texts = tmp_path / "t.txt"
    texts.write_text("hello there\n")
    with_file = AlignGuardParams(alignguard_data=str(texts))
    (enc, enc_ctx), (dec, dec_ctx) = encoder, decoder
    with pytest.raises(ConfigError, match="is for decoders"):
        representation_probe(enc.model, with_file, enc_ctx)
    with pytest.raises(ConfigError, match="needs the run's tokenizer"):
        text_probe(dec.model, with_file, _without_tokenizer(dec_ctx))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classification", "causal"])
def test_alignguard_trains_in_the_loop_and_records_the_drift(kind, sst2_dir, gsm8k_dir, tmp_path, monkeypatch):
    import lorabench.analysis.forgetting as forgetting
    from tests.conftest import tiny_overrides
    from tests.test_resume import only_run_dir, train

    monkeypatch.setattr(forgetting, "SAMPLE_TOKENS", 8)
    data = sst2_dir if kind == "classification" else gsm8k_dir
    extra = ["train.max_steps=3", "train.log_every=1", "method.alignguard_samples=4", "method.alignguard_top_k=2"]
    assert train("method=alignguard_lora", *tiny_overrides(kind, data, tmp_path, *extra)) == 0
    record = json.loads((only_run_dir(tmp_path) / "record.json").read_text())
    assert record["status"] == "completed"
    terms = [entry["terms"] for entry in record["train_log"]]
    assert terms[0] == {"align": 0.0, "task": 0.0, "collision": 0.0}  # B = 0 at the start
    assert terms[-1]["task"] > 0
    report = record["method_report"]["regularizer"]
    assert report["alignment"]["after"] is not None and report["alignment"]["after"] != report["alignment"]["before"]
    assert report["signal"] == ("hidden_state" if kind == "classification" else "lm_nll")
