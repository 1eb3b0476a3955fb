"""GaLore's measured optimizer-state bytes equal the analytic value on the tiny model: per
projected m x n weight, 2 moments of r x max(m, n) plus the stored projection matrix (held inside
galore-torch's projector objects); full AdamW moments for every other parameter.

galore-torch keeps its projection as a slice (a view) of the full SVD factor, so the memory it
actually holds per matrix is min(m, n)^2 floats, not r x min(m, n): the measurement counts storage,
which is what occupies memory."""

from __future__ import annotations

from lorabench.measure import optimizer_state_bytes
from lorabench.methods.base import target_linear_weights
from tests.method_harness import one_step


def test_galore_state_bytes_match_formula(sst2_dir, tmp_path):
    rank = 4
    result = one_step("galore_torch", sst2_dir, tmp_path, f"method.rank={rank}")
    model = result.built.model
    projected = {id(w): w for _, w in target_linear_weights(model, result.ctx.target_modules)}
    assert projected, "GaLore projected nothing"
    expected = 0
    for p in model.parameters():
        if id(p) in projected:
            m, n = p.shape
            expected += (2 * rank * max(m, n) + min(m, n) ** 2) * 4
        else:
            expected += 2 * p.numel() * 4
    assert optimizer_state_bytes(result.built.optimizer) == expected


def test_lora_state_bytes_are_adapter_moments(sst2_dir, tmp_path):
    result = one_step("lora", sst2_dir, tmp_path)
    trainable = sum(p.numel() for p in result.built.model.parameters() if p.requires_grad)
    # torch AdamW: exp_avg, exp_avg_sq per parameter plus a scalar fp32 step tensor each
    n_params = sum(1 for p in result.built.model.parameters() if p.requires_grad)
    assert optimizer_state_bytes(result.built.optimizer) == 2 * trainable * 4 + n_params * 4
