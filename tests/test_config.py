"""Config composition: every group option composes, every method preset validates, help lists the
groups. The validation errors themselves are the corpus of tests/test_bad_input.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.errors import ConfigError
from lorabench.validate import build_run
from tests.conftest import CONF_DIR, compose

# sweep presets are appended with +sweep=... (tests/test_sweeps.py); every other group is selected
GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF_DIR.iterdir() if g.is_dir() and g.name != "sweep"
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group: str, option: str):
    cfg = compose([f"{group}={option}"])
    assert cfg[group]  # the option's values landed in the composed config


@pytest.mark.parametrize("method", GROUPS["method"])
def test_every_method_preset_validates(method: str):
    cfg = compose([f"method={method}", "model=tiny_bert", "dataset=sst2"])
    try:
        _, spec = build_run(cfg)
    except ConfigError as exc:  # presets that need CUDA or trained experts must say so clearly
        assert "cuda" in str(exc).lower() or "experts" in str(exc), exc
        return
    assert spec.label


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorabench.cli", *args], capture_output=True, text=True, timeout=120)


def test_bad_input_through_the_real_entry_point(tmp_path: Path):
    """One subprocess check that the console entry point prints no traceback either."""
    proc = cli("train", "method.rank=0", f"results_dir={tmp_path}")
    assert proc.returncode == 2 and "method.rank=0" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_groups():
    proc = cli("train", "--help")
    assert proc.returncode == 0
    for group in ("model", "method", "dataset", "train", "hardware"):
        assert group in proc.stdout
    assert "galore" in proc.stdout
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "table" in top.stdout


def test_gradient_accumulation_is_derived():
    cfg, _ = build_run(
        compose(["train.global_batch_size=32", "hardware.micro_batch_size=4", "model=tiny_bert", "dataset=sst2"])
    )
    assert cfg.gradient_accumulation() == 8
