"""X-LoRA: train two LoRA experts through the loop, then the X-LoRA classifier over them; only
the classifier trains, and an expert list that is too short or wrong is refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorabench.cli import main
from tests.conftest import tiny_overrides


def train(*overrides: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    return exc.value.code


def test_xlora_over_two_trained_experts(gsm8k_dir, tmp_path, capsys):
    experts = []
    for seed in (0, 1):  # two experts (in practice: one per task)
        root = tmp_path / f"expert{seed}"
        assert train("method=lora", *tiny_overrides("causal_lm", gsm8k_dir, root), f"seed={seed}") == 0
        (run_dir,) = [p.parent for p in root.rglob("record.json")]
        assert (run_dir / "peft_adapter" / "adapter_config.json").is_file()
        experts.append(str(run_dir))
    root = tmp_path / "xlora"
    assert (
        train(
            "method=xlora",
            f"method.experts=[{','.join(experts)}]",
            "method.xlora_size=16",
            *tiny_overrides("causal_lm", gsm8k_dir, root),
        )
        == 0
    )
    record = json.loads(next(root.rglob("record.json")).read_text())
    assert record["status"] == "completed" and record["method"]["adapter"] == "xlora"
    assert 0 < record["cost"]["trainable_params"] < 2000  # the classifier only, the experts stay frozen


@pytest.mark.parametrize("experts,needle", [("[]", "at least 2"), ("[/nonexistent,/nonexistent2]", "/nonexistent")])
def test_xlora_refuses_bad_experts(experts, needle, gsm8k_dir, tmp_path, capsys):
    assert train("method=xlora", f"method.experts={experts}", *tiny_overrides("causal_lm", gsm8k_dir, tmp_path)) == 2
    assert needle in capsys.readouterr().err
    assert not list(Path(tmp_path).rglob("record.json"))
