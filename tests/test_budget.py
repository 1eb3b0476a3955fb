"""Size budgets: for every preset whose components declare a size knob, the solved value fits the
budget, the next larger value would not, and the count measured after ``apply_method`` (or the
optimizer state measured after one step) equals the prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorabench.budget import (
    LAYER_COUNT_KNOBS,
    knob_value_is_valid,
    method_knob,
    optimizer_state_bytes,
    solve_budget,
    with_value,
)
from lorabench.errors import ConfigError
from lorabench.measure import optimizer_state_bytes as measured_state_bytes
from lorabench.measure import parameter_counts
from lorabench.methods.build import apply_method, expected_trainable
from lorabench.preflight import check_rank
from tests.method_harness import build, one_step

METHOD_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"
# X-LoRA composes trained experts and has no size knob: tests/test_xlora.py
PRESETS = sorted(p.stem for p in METHOD_DIR.glob("*.yaml") if p.stem != "xlora")
UNSUPPORTED_STATE = {"q_galore", "dct_adamw"}  # documented in lorabench/budget.py


def _overrides(result: dict) -> list[str]:
    return [f"method.{field}={result['value']}" for field in result["knob"].split("=")]


def _budget_between(size, cap: int) -> tuple[int, int]:
    """A budget strictly between the sizes at v and v + 1, so the answer is v."""
    v = max(1, min(3, cap - 1))
    return v, size(v) + max(1, (size(v + 1) - size(v)) // 2)


@pytest.mark.parametrize("preset", PRESETS)
def test_budget_solves_and_matches_measurement(preset, sst2_dir, tmp_path):
    try:
        cfg, spec, loaded, _, ctx = build(preset, sst2_dir, tmp_path)
    except ConfigError as exc:
        if "CUDA" in str(exc):
            pytest.skip(f"{preset} needs CUDA: {exc}")
        raise
    found = method_knob(spec)
    if found is None:
        with pytest.raises(ConfigError, match="declares no size knob"):
            solve_budget(loaded.model, spec, ctx, trainable_params=10_000)
        return
    axis, fields = found
    if axis == "optimizer":
        with pytest.raises(ConfigError, match="optimizer_state_mb"):
            solve_budget(loaded.model, spec, ctx, trainable_params=10_000)
        if spec.names["optimizer"] in UNSUPPORTED_STATE:
            with pytest.raises(ConfigError, match="not supported"):
                solve_budget(loaded.model, spec, ctx, optimizer_state_mb=1.0)
            return

        def state(v):
            return optimizer_state_bytes(loaded.model, with_value(spec, axis, fields, v), ctx)

        lo, hi = (0.25, 0.5) if isinstance(getattr(spec.params[axis], fields[0]), float) else (3, 4)
        assert state(hi) > state(lo)
        result = solve_budget(loaded.model, spec, ctx, optimizer_state_mb=(state(lo) + state(hi)) / 2 / 2**20)
        assert result["predicted"] <= result["budget"]
        bigger = result["value"] + (1e-3 if isinstance(result["value"], float) else 1)
        assert optimizer_state_bytes(loaded.model, with_value(spec, axis, fields, bigger), ctx) > result["budget"]
        measured = measured_state_bytes(one_step(preset, sst2_dir, tmp_path, *_overrides(result)).built.optimizer)
        assert measured == result["predicted"], result
        return

    def size(v):
        return expected_trainable(loaded.model, with_value(spec, axis, fields, v), ctx)

    cap = 2 if fields in LAYER_COUNT_KNOBS else 32  # tiny_bert has 2 layers
    v, budget = _budget_between(size, cap)
    result = solve_budget(loaded.model, spec, ctx, trainable_params=budget)
    assert result["predicted"] <= budget < size(v + 1), result
    while not knob_value_is_valid(loaded.model, spec, axis, fields, v, ctx):
        v -= 1  # shape constraints (Bone's block size, PEGO's group): the largest valid value below
    assert result["value"] == v and not result["capped"]
    # the count after apply_method on a fresh model with the solved value equals the prediction
    _, spec2, loaded2, _, ctx2 = build(preset, sst2_dir, tmp_path, *_overrides(result))
    built = apply_method(loaded2.model, spec2, ctx2)
    assert parameter_counts(built.model)[0] == result["predicted"]


def test_budget_below_smallest_size_is_refused(sst2_dir, tmp_path):
    _, spec, loaded, _, ctx = build("lora", sst2_dir, tmp_path)
    with pytest.raises(ConfigError, match="below method 'lora'"):
        solve_budget(loaded.model, spec, ctx, trainable_params=10)
    with pytest.raises(ConfigError, match="exactly one"):
        solve_budget(loaded.model, spec, ctx)


def test_budget_larger_than_the_cap_says_capped(sst2_dir, tmp_path):
    _, spec, loaded, _, ctx = build("lora", sst2_dir, tmp_path)
    result = solve_budget(loaded.model, spec, ctx, trainable_params=10**9)
    assert result["capped"] and result["value"] == 32  # tiny_bert's hidden size


def test_bone_budget_steps_down_to_a_block_size_that_divides_every_target(sst2_dir, tmp_path):
    """Bone's trainable count is r * d_out per target, but r must divide d_in and d_out: a budget that
    rank 6 fits exactly gives Bone 4 (tiny_bert's targets are 32 x 32), and MiSS mode, free of that
    constraint, 6."""
    _, bone, loaded, _, ctx = build("bone", sst2_dir, tmp_path)
    _, miss, miss_model, _, miss_ctx = build("miss", sst2_dir, tmp_path)
    budget = expected_trainable(loaded.model, with_value(bone, "adapter", ("rank",), 6), ctx)
    assert solve_budget(miss_model.model, miss, miss_ctx, trainable_params=budget)["value"] == 6
    result = solve_budget(loaded.model, bone, ctx, trainable_params=budget)
    assert result["value"] == 4 and result["predicted"] < budget and not result["capped"]


# preset -> the cap on tiny_llama (q_proj 32 x 32, GQA v_proj 16 x 32): a factor rank the smallest target's 16
# (what the preflight check accepts); the ranks that are not a factor rank (VeRA) the largest target's 32;
# LoRA-GA 8 (2r gradient singular vectors); knobs other than a rank their size_limit
RANK_KNOB_PRESETS = {
    "lora": 16,
    "vera": 32,
    "slora": 16,
    "corda": 16,
    "pissa": 16,
    "olora": 16,
    "soma": 16,
    "lora_xs": 16,
    "svfit": 16,
    "loldu": 16,
    "lora_sb": 16,
    "nlora": 16,
    "lamda": 16,
    "lora_ga": 8,
    "salt": 24,  # lora_rank q <= k - r = 32 - 8 of the largest target
    "nola": 256,  # num_basis = r * d = 8 * 32 bases span every A, B of the widest target
}


@pytest.mark.parametrize("preset, cap", RANK_KNOB_PRESETS.items())
def test_an_unreachable_budget_caps_at_a_rank_every_target_accepts(preset, cap, sst2_dir, tmp_path):
    """tiny_llama's targets differ in size (q_proj 32 x 32, GQA v_proj 16 x 32, like SmolLM2's 576 vs
    192): a budget no rank can reach must cap at a rank the run accepts (the preflight check: a factor
    rank may not exceed any target's min(d_out, d_in); VeRA's shared rank may), not fail at preflight
    or apply time (S2-LoRA's budget on SmolLM2 solved rank 232 for the 192-wide v_proj)."""
    _, spec, loaded, _, ctx = build(preset, sst2_dir, tmp_path, "model=tiny_llama")
    result = solve_budget(loaded.model, spec, ctx, trainable_params=10**9)
    assert result["capped"] and result["value"] == cap, result
    cfg2, spec2, loaded2, _, ctx2 = build(preset, sst2_dir, tmp_path, "model=tiny_llama", *_overrides(result))
    check_rank(spec2, cfg2, loaded2.model, ctx2)  # the solved rank passes the run's own check
    apply_method(loaded2.model, spec2, ctx2)  # raised "method.rank=32 exceeds min(d_out, d_in)=16" (corda:
    # peft's "rank mismatch: 16 vs. 32"; lora_ga: "shapes cannot be multiplied (32x0 and 32x32)") before the cap knew


@pytest.mark.parametrize("preset, most", [("lora_ga", 8), ("pissa", 16)])
def test_a_rank_an_svd_based_init_cannot_take_is_a_config_error_before_calibration(preset, most, sst2_dir, tmp_path):
    """A rank above what every target gives (LoRA-GA needs 2r singular vectors of each gradient) is named
    with the valid range before any calibration pass, not a shape mismatch inside peft."""
    _, spec, loaded, _, ctx = build(preset, sst2_dir, tmp_path, "model=tiny_llama", f"method.rank={most + 1}")
    ctx.calibration_batches = lambda: pytest.fail("calibration ran before the rank check")
    expected = rf"method.rank={most + 1} is too large.*valid choices are 1\.\.{most}.*v_proj"
    with pytest.raises(ConfigError, match=expected):
        apply_method(loaded.model, spec, ctx)
    _, spec, loaded, _, ctx = build(preset, sst2_dir, tmp_path, "model=tiny_llama", f"method.rank={most}")
    apply_method(loaded.model, spec, ctx)  # the largest valid rank applies


def test_preflight_leaves_a_budget_whose_size_needs_the_weights_to_the_run(sst2_dir, tmp_path):
    """LaMDA++'s ranks come from the spectrum of W0, which the meta-device model of the pre-flight does
    not have: the pre-flight leaves that budget to train.py (which solves it on the loaded weights)
    instead of failing the run; a shape-only budget is still solved there."""
    from lorabench.preflight import preflight
    from lorabench.validate import build_run
    from tests.conftest import compose, tiny_overrides

    def checked(method: str):
        cfg_dict = compose([f"method={method}", *tiny_overrides("classification", sst2_dir, tmp_path)])
        cfg_dict["budget"]["trainable_params"] = 3000
        return preflight(*build_run(cfg_dict))

    assert checked("lamda_plus") is not None  # no RuntimeError from an SVD of meta weights
    assert checked("lora").expected_trainable <= 3000
