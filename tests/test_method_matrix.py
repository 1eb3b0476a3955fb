"""Every method preset in conf/method, one step on a tiny model: finite loss, only intended
parameters change, and the trainable-parameter count equals the method's closed form."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorabench.methods.catalog import load_presets
from tests.conftest import CONF_DIR
from tests.method_harness import changed, one_step

PRESETS = load_presets(CONF_DIR / "method")
CUDA_ONLY = {name for name, raw in PRESETS.items() if raw.get("requires_cuda")}
NEEDS_EXPERTS = {name for name, raw in PRESETS.items() if "experts" in raw}  # X-LoRA: tests/test_xlora.py


@pytest.mark.parametrize("method", sorted(set(PRESETS) - CUDA_ONLY - NEEDS_EXPERTS))
def test_one_step(method: str, sst2_dir: Path, tmp_path: Path):
    result = one_step(method, sst2_dir, tmp_path)
    assert result.loss == result.loss and abs(result.loss) < 1e4, f"non-finite loss {result.loss}"
    moved = changed(result)
    assert moved, "nothing changed after one optimizer step"
    frozen_moved = moved - result.trainable
    assert not frozen_moved, f"frozen parameters changed: {sorted(frozen_moved)[:5]}"
    count = sum(result.after[n].numel() for n in result.trainable)
    if result.expected_trainable is not None:
        assert count == result.expected_trainable
