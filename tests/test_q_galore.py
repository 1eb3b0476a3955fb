"""Q-GaLore (lorabench/methods/optimizers/q_galore.py) by hand: the lazy refresh's gap schedule, the
INT4 group quantizer, the 8-bit moment quantizer, optimizer-state bytes, checkpoints and the
parameter checks. tests/test_parity_q_galore.py holds the comparison with the authors' code."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.measure import optimizer_state_bytes
from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers.q_galore import (
    QGaLore,
    QGaLoreParams,
    QGaLoreProjector,
    dequantize_blockwise,
    dequantize_groups,
    dynamic_map,
    quantize_blockwise,
    quantize_groups,
)

MATS = [(24, 16), (16, 24), (10, 16)]  # projected weights of stack()


def stack(seed: int = 0) -> nn.Sequential:
    """Three projected weights: 24x16 (right side, d=16), 16x24 (left, d=16), 10x16 (left, d=10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 10))


def build(model: nn.Module, **params):
    ctx = MethodContext(
        target_modules=["0", "2", "4"], head="classification", lr=1e-2, weight_decay=0.01, max_steps=10, seed=0
    )
    return QGaLore().build(model, QGaLoreParams(**params), ctx)


def run(model, opt, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)


# (1) the lazy layer-adaptive refresh ----------------------------------------------------------


def schedule(grads, **kw) -> tuple[list[int], list[int]]:
    """The steps at which the projector ran an SVD, and its gap after each step (gap 1 to start)."""
    proj = QGaLoreProjector(grads[0].shape, 2, 1, **kw)
    svds, gaps = [], []
    for t, g in enumerate(grads):
        if proj.due(t):
            proj.refresh(g, t)
            svds.append(t)
        gaps.append(proj.gap)
    return svds, gaps


def test_a_constant_subspace_doubles_the_gap_at_every_svd_once_the_queue_is_full():
    g = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    svds, gaps = schedule([g] * 40)
    # 5 cosines (all 1) need 6 SVDs; then the queue stays full and is never cleared, so every later
    # SVD doubles the gap again: steps 6 (gap 2), 8 (4), 16 (8), 32 (16 -> 32).
    assert svds == [0, 1, 2, 3, 4, 5, 6, 8, 16, 32]
    assert gaps[4] == 1 and gaps[5] == 2 and gaps[6] == 4 and gaps[-1] == 32


def test_queue_length_threshold_and_factor_are_the_knobs():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))  # right side
    svds, gaps = schedule([g] * 30, queue_size=2, gamma_proj=3)
    assert svds == [0, 1, 2, 3, 9, 27] and gaps[-1] == 81
    noisy = [torch.randn(16, 32, generator=torch.Generator().manual_seed(s)) for s in range(30)]
    assert schedule(noisy, cos_threshold=0.999)[0] == list(range(30))  # never stable: an SVD every step


def test_cosines_are_signed_and_taken_before_quantization():
    g = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    proj = QGaLoreProjector(g.shape, 2, 1)
    proj.refresh(g, 0)
    first = proj.leading.clone()
    assert torch.allclose(first, torch.linalg.svd(g)[0][:, 0])  # the fp32 leading vector, not the INT4 one
    proj.refresh(-g, 1)
    proj.refresh(g, 2)
    assert len(proj.queue) == 2 and all(abs(abs(c) - 1) < 1e-5 for c in proj.queue)
    assert proj.gap == 1  # queue not full yet


# (2) INT4 projection storage -----------------------------------------------------------------


@pytest.mark.parametrize("shape,group", [((8, 64), 256), ((64, 8), 256), ((5, 30), 256), ((4, 50), 64), ((6, 7), -1)])
def test_int4_groups_round_trip_within_half_a_step(shape, group):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) / 4
    codes, scales, zeros = quantize_groups(x, 4, group)
    numel = x.numel()
    size = group if group > 0 else shape[1]
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(numel / 2)  # two codes per byte
    assert scales.shape == zeros.shape == (math.ceil(numel / size), 1) and zeros.dtype == torch.uint8
    back = dequantize_groups(codes, scales, zeros, 4, group, shape)
    step = scales.repeat_interleave(size)[:numel].view(shape)
    assert ((back - x).abs() <= step / 2 + 1e-6).all()
    flat = x.reshape(-1)
    last = flat[(scales.shape[0] - 1) * size :]  # a short last group keeps its own min and max
    assert scales[-1].item() == pytest.approx((last.max() - last.min()).item() / 15, rel=1e-6)


def test_fp32_basis_when_bits_is_32():
    g = torch.randn(20, 12, generator=torch.Generator().manual_seed(7))  # right side
    proj = QGaLoreProjector(g.shape, 3, 1, bits=32)
    proj.refresh(g, 0)
    assert torch.equal(proj.basis(), torch.linalg.svd(g, full_matrices=False)[2][:3])
    assert proj.codes is None and [t.shape for t in proj.state_tensors()] == [(3, 12), (12,)]


def test_int4_codes_use_all_16_levels():
    x = torch.linspace(-0.3, 0.5, 256).view(4, 64)
    codes, scales, zeros = quantize_groups(x, 4, 256)
    q = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)
    assert q.min().item() == 0 and q.max().item() == 15 and len(set(q.tolist())) == 16
    assert scales.item() == pytest.approx(0.8 / 15) and zeros.item() == round(0.3 / (0.8 / 15))


# (3) 8-bit moments ---------------------------------------------------------------------------


def test_dynamic_maps_span_the_unit_interval():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert signed.numel() == unsigned.numel() == 256
    assert (signed.diff() > 0).all() and (unsigned.diff() > 0).all()
    assert signed[-1] == 1 and unsigned[-1] == 1 and unsigned[0] == 0 and 0 in signed.tolist()
    assert signed[0].item() == pytest.approx(-0.99297, abs=1e-5)


def test_blockwise_nearest_code_and_sign_of_m():
    qmap = dynamic_map(True)
    x = torch.randn(700, generator=torch.Generator().manual_seed(4))
    x[5] = -1e-9 * x[:256].abs().max()  # nearest entry 0: it keeps its sign
    codes, absmax = quantize_blockwise(x, qmap, signed=True)
    assert codes.shape == x.shape and absmax.shape == (3,)
    normed = x / absmax.repeat_interleave(256)[:700]
    nearest = (normed.unsqueeze(1) - qmap).abs().argmin(dim=1)
    nudged = torch.zeros(700, dtype=torch.bool)
    nudged[5] = True
    assert torch.equal(codes.long()[~nudged], nearest[~nudged])
    assert qmap[codes[5].long()] < 0 and qmap[nearest[5]] == 0
    back = dequantize_blockwise(codes, absmax, qmap)
    assert ((back - x).abs() <= 0.02 * absmax.repeat_interleave(256)[:700]).all()


def test_large_tensors_keep_8bit_moments_small_ones_fp32():
    model = stack()
    opt = build(model, rank=4, min_8bit_size=80)
    run(model, opt, 2)
    state = opt.state[model[0].weight]  # R is 24 x 4 = 96 entries
    assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_q"].shape == (24, 4)
    assert state["exp_avg_absmax"].shape == (1,) and "exp_avg" not in state
    assert opt.state[model[4].weight]["exp_avg"].dtype == torch.float32  # R is 4 x 16 = 64 < 80 entries
    assert opt.state[model[4].bias]["exp_avg"].shape == (10,)


# (4) optimizer-state bytes --------------------------------------------------------------------


def projector_bytes(r: int, m: int, n: int) -> int:
    d = min(m, n)
    groups = math.ceil(r * d / 256)
    return math.ceil(r * d / 2) + 4 * groups + groups + 4 * d  # INT4 codes, fp32 scales, uint8 zeros, leading vector


def test_state_bytes_fp32_moments():
    model = stack()
    opt = build(model, rank=4)
    run(model, opt, 1)
    biases = 2 * 4 * (24 + 16 + 10)
    expected = biases + sum(2 * 4 * 4 * max(m, n) + projector_bytes(4, m, n) for m, n in MATS)
    assert optimizer_state_bytes(opt) == expected


def test_state_bytes_8bit_moments():
    model = stack()
    opt = build(model, rank=4, min_8bit_size=1)
    run(model, opt, 1)

    def moments(n: int) -> int:  # two uint8 tensors and one fp32 absmax per 256-entry block each
        return 2 * (n + 4 * math.ceil(n / 256))

    expected = sum(moments(n) for n in (24, 16, 10))
    expected += sum(moments(4 * max(m, n)) + projector_bytes(4, m, n) for m, n in MATS)
    expected += 2 * 256 * 4  # the two dynamic maps, once per optimizer
    assert optimizer_state_bytes(opt) == expected


# (5) checkpoints ------------------------------------------------------------------------------


def test_resume_continues_bit_for_bit():
    straight, resumed = stack(), stack()
    opt_a = build(straight, rank=4, min_8bit_size=16, update_proj_gap=2)
    opt_b = build(resumed, rank=4, min_8bit_size=16, update_proj_gap=2)
    run(straight, opt_a, 7, seed=5)
    run(resumed, opt_b, 4, seed=5)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = stack()
    again.load_state_dict(saved["model"])
    opt_c = build(again, rank=4, min_8bit_size=16, update_proj_gap=2)
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.state[again[0].weight]["exp_avg_q"].dtype == torch.uint8
    assert isinstance(opt_c.state[again[0].weight]["projector"], QGaLoreProjector)
    gen = torch.Generator().manual_seed(5)  # replay the seeded stream: 4 steps done, 3 to go
    for step in range(7):
        grads = [torch.randn(p.shape, generator=gen) for p in again.parameters()]
        if step < 4:
            continue
        for p, g in zip(again.parameters(), grads):
            p.grad = g
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.equal(a, b)


# (6) parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"proj_bits": 3}, "proj_bits=3"),
        ({"proj_group_size": 0}, "proj_group_size=0"),
        ({"cos_threshold": 1.5}, "cos_threshold=1.5"),
        ({"gamma_proj": 0}, "gamma_proj=0"),
        ({"queue_size": 0}, "queue_size=0"),
        ({"proj_type": "left"}, "proj_type='left'"),
    ],
)
def test_params_validate_with_clear_messages(kw, match):
    with pytest.raises(ConfigError, match=match):
        QGaLoreParams(**kw)


def test_defaults_are_the_authors():
    p = QGaLoreParams()
    assert (p.proj_bits, p.proj_group_size, p.cos_threshold, p.queue_size, p.gamma_proj) == (4, 256, 0.4, 5, 2)
    assert (p.min_8bit_size, p.eps, p.beta1, p.beta2) == (4096, 1e-8, 0.9, 0.999)
