"""NOLA's quantised coefficients (method.coef_bits, method.quant_aware; lorabench/methods/adapters/nola.py):
the forward uses exactly the hand-computed dequantisation, the straight-through gradient is the gradient
at the quantised point, the error is at most half a step, the adapter file stores bit-packed codes (smaller
than float32, bases never saved) and reloads bit-for-bit, the default stays unquantised, and bad bit widths
are refused with the valid choices."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.methods.adapters.layer import adapter_layers, load_trainable, save_trainable
from lorabench.methods.adapters.nola import COEF_BITS, NolaLayer, quantize_coefs
from lorabench.methods.build import apply_method
from lorabench.validate import build_run
from tests.conftest import tiny_overrides
from tests.method_harness import build

SMALL = ("method.num_basis_a=64", "method.num_basis_b=32")


def make(data_dir: Path, tmp: Path, *extra: str):
    """(built method, one batch, ctx) for NOLA on the tiny classifier."""
    _, spec, loaded, loader, ctx = build("nola", data_dir, tmp, *SMALL, *extra)
    built = apply_method(loaded.model, spec, ctx)
    return built, next(iter(loader)), ctx


def quant_opts(bits: int | None, quant_aware: bool = True) -> tuple[str, ...]:
    if bits is None:
        return ()
    return (f"+method.coef_bits={bits}", f"+method.quant_aware={str(quant_aware).lower()}")


def set_coefs(model, seed: int = 1) -> None:
    """Non-trivial coefficients (both start at zero), the same in every model built alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.coef_A.copy_(torch.randn(layer.coef_A.shape, generator=gen))
            layer.coef_B.copy_(torch.randn(layer.coef_B.shape, generator=gen) * 0.3)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def hand_quant(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The docstring's rule written out: lo = min, step = (max - min) / (2^b - 1), round half even."""
    c = c.detach()
    lo, hi = c.min(), c.max()
    step = (hi - lo) / (2**bits - 1)
    codes = torch.round((c - lo) / step).clamp(0, 2**bits - 1)
    return codes, lo, step, lo + step * codes


@pytest.mark.parametrize("bits", [4, 3])
def test_forward_uses_hand_dequantised_coefficients(bits, sst2_dir, tmp_path):
    built, batch, _ = make(sst2_dir, tmp_path, *quant_opts(bits))
    ref, _, _ = make(sst2_dir, tmp_path)  # unquantised, coefficients set to the hand-made q below
    set_coefs(built.model)
    ref_layers = adapter_layers(ref.model)
    with torch.no_grad():
        for name, layer in adapter_layers(built.model).items():
            assert isinstance(layer, NolaLayer) and layer.coef_bits == bits
            qa, qb = hand_quant(layer.coef_A, bits)[3], hand_quant(layer.coef_B, bits)[3]
            assert not torch.equal(qa, layer.coef_A)  # quantisation does change them
            for mode in (True, False):  # QAT: training and evaluation both use q
                layer.train(mode)
                coef_a, coef_b = layer.coefficients()
                assert torch.equal(coef_a, qa) and torch.equal(coef_b, qb)
            a = torch.einsum("k,krd->rd", qa, layer.basis_A) + layer.lora_A0  # A0 is frozen, never quantised
            b = torch.einsum("l,lor->or", qb, layer.basis_B)
            assert torch.equal(layer.delta_weight(), layer.scale * b @ a)
            ref_layers[name].coef_A.copy_(qa)
            ref_layers[name].coef_B.copy_(qb)
    torch.testing.assert_close(logits(built.model, batch), logits(ref.model, batch), rtol=0, atol=0)


def test_post_training_quantisation_trains_in_float(sst2_dir, tmp_path):
    built, batch, _ = make(sst2_dir, tmp_path, *quant_opts(4, quant_aware=False))
    set_coefs(built.model)
    for layer in adapter_layers(built.model).values():
        layer.train()
        assert all(c is p for c, p in zip(layer.coefficients(), (layer.coef_A, layer.coef_B)))
        layer.eval()
        assert torch.equal(layer.coefficients()[0], hand_quant(layer.coef_A, 4)[3])
    # merge in training mode, unmerge in eval mode: the same Delta W comes back out
    layers = adapter_layers(built.model).values()
    before = [layer.base.weight.detach().clone() for layer in layers]
    for layer in layers:
        layer.train()
        layer.merge()
        layer.eval()
        layer.unmerge()
    for w0, layer in zip(before, layers):
        torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 3])
def test_straight_through_gradient_is_the_gradient_at_q(bits, sst2_dir, tmp_path):
    built, batch, _ = make(sst2_dir, tmp_path, *quant_opts(bits))
    ref, _, _ = make(sst2_dir, tmp_path)
    set_coefs(built.model)
    ref_layers = adapter_layers(ref.model)
    with torch.no_grad():
        for name, layer in adapter_layers(built.model).items():
            ref_layers[name].coef_A.copy_(hand_quant(layer.coef_A, bits)[3])
            ref_layers[name].coef_B.copy_(hand_quant(layer.coef_B, bits)[3])
    for model in (built.model, ref.model):
        model.train()
        torch.manual_seed(0)  # the same dropout masks
        model(**batch).loss.backward()
    for name, layer in adapter_layers(built.model).items():
        for coef in ("coef_A", "coef_B"):
            grad, expected = getattr(layer, coef).grad, getattr(ref_layers[name], coef).grad
            assert grad is not None and grad.abs().sum() > 0
            torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_quantisation_error_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    for bits in COEF_BITS:
        for c in (torch.randn(1000, generator=gen), torch.rand(37, generator=gen) * 1e-3 - 5.0):
            codes, lo, step = quantize_coefs(c, bits)
            q = lo + step * codes.float()
            assert codes.dtype == torch.uint8 and int(codes.max()) == 2**bits - 1 and int(codes.min()) == 0
            assert lo == c.min() and step == (c.max() - c.min()) / (2**bits - 1)
            assert torch.all((q - c).abs() <= step / 2 * (1 + 1e-5) + 1e-6 * c.abs().max()), bits
            assert torch.equal(codes.float(), hand_quant(c, bits)[0])
        const = torch.full((5,), 0.25)  # one value: step 0, every code 0, exact
        codes, lo, step = quantize_coefs(const, bits)
        assert step == 0 and torch.equal(lo + step * codes.float(), const) and not codes.any()


@pytest.mark.parametrize(("bits", "quant_aware"), [(4, True), (3, True), (4, False)])
def test_saved_file_smaller_and_round_trips(bits, quant_aware, sst2_dir, tmp_path):
    opts = quant_opts(bits, quant_aware)
    built, batch, ctx = make(sst2_dir, tmp_path, *opts)
    plain, _, plain_ctx = make(sst2_dir, tmp_path)
    set_coefs(built.model)
    set_coefs(plain.model)
    out = logits(built.model, batch)
    assert not torch.equal(out, logits(plain.model, batch))  # quantisation is visible in the outputs
    q_path, f_path = tmp_path / "q.safetensors", tmp_path / "f.safetensors"
    q_size, f_size = save_trainable(built.model, q_path), save_trainable(plain.model, f_path)
    assert q_size < f_size
    saved, plain_saved = load_file(str(q_path)), load_file(str(f_path))
    assert not any("basis" in k for k in saved) and not any("basis" in k for k in plain_saved)
    coef_bytes = 0
    for name, layer in adapter_layers(built.model).items():
        assert f"{name}.coef_A" not in saved and f"{name}.coef_B" not in saved
        for coef in ("coef_A", "coef_B"):
            codes, qparams = saved[f"{name}.{coef}_codes"], saved[f"{name}.{coef}_qparams"]
            n = getattr(layer, coef).numel()
            assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(n * bits / 8)
            assert qparams.dtype == torch.float32 and qparams.shape == (2,)
            _, lo, step, _ = hand_quant(getattr(layer, coef), bits)
            assert torch.equal(qparams, torch.stack([lo, step]))
            coef_bytes += codes.numel() + 8
    # the record reports the coefficient bytes (method_report via ctx.extras)
    assert ctx.extras["nola_coef_storage_bytes"] == coef_bytes
    layers = adapter_layers(plain.model).values()
    assert plain_ctx.extras["nola_coef_storage_bytes"] == sum(4 * (m.coef_A.numel() + m.coef_B.numel()) for m in layers)
    # reload into a freshly built model: bit-for-bit outputs, and saving again writes the same codes
    fresh, _, _ = make(sst2_dir, tmp_path, *opts)
    assert not torch.equal(logits(fresh.model, batch), out)
    load_trainable(fresh.model, q_path)
    torch.testing.assert_close(logits(fresh.model, batch), out, rtol=0, atol=0)
    again = tmp_path / "again.safetensors"
    save_trainable(fresh.model, again)
    resaved = load_file(str(again))
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], saved[k]) for k in saved)
    # moving the loaded model keeps the pinned quantisation
    moved = copy.deepcopy(fresh.model).to(torch.float32)
    torch.testing.assert_close(logits(moved, batch), out, rtol=0, atol=0)
    # training on after loading: once the coefficients change, they are quantised afresh
    fresh.model.train()
    fresh.model(**batch).loss.backward()
    fresh.optimizer.step()
    for layer in adapter_layers(fresh.model).values():
        if quant_aware:
            assert torch.equal(layer.coefficients()[0], hand_quant(layer.coef_A, bits)[3])
        else:
            assert layer.coefficients()[0] is layer.coef_A


def test_default_is_unquantised_and_keeps_the_config(sst2_dir, tmp_path):
    cfg = compose(["method=nola", *tiny_overrides("classification", sst2_dir, tmp_path)])
    assert "coef_bits" not in cfg["method"] and "quant_aware" not in cfg["method"]  # run ids unchanged
    built, _, ctx = make(sst2_dir, tmp_path)
    path = tmp_path / "plain.safetensors"
    save_trainable(built.model, path)
    keys = set(load_file(str(path)))
    for name, layer in adapter_layers(built.model).items():
        assert layer.coef_bits is None and layer.packed_tensors() is None
        assert {f"{name}.coef_A", f"{name}.coef_B"} <= keys
    assert not any("codes" in k or "qparams" in k for k in keys)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bad_bits_name_value_and_choices(bits, sst2_dir, tmp_path):
    cfg = compose(["method=nola", *tiny_overrides("classification", sst2_dir, tmp_path), f"+method.coef_bits={bits}"])
    with pytest.raises(ConfigError) as err:
        build_run(cfg)
    msg = str(err.value)
    assert f"method.coef_bits={bits}" in msg and "valid choices: null (off), 2, 3, 4, 5, 6, 7, 8" in msg
