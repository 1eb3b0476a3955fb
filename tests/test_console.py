"""A run's output is the run's: no library noise (bitsandbytes' optional-kernel note, transformers'
LOAD REPORT, loading bars, library deprecation warnings), our own line for tensors a checkpoint
lacks, and progress bars for evaluation and calibration-based inits only when progress=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_overrides

BIN = Path(sys.executable).parent
NOISE = ("Failed to load CPU gemm_4bit_forward", "LOAD REPORT", "Loading weights", "FutureWarning", "were not sharded")


def lorabench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning a library raises
    return subprocess.run([str(BIN / "lorabench"), *args], capture_output=True, text=True, timeout=600, env=env)


def test_a_pretrained_run_prints_no_library_noise(sst2_dir, tmp_path):
    args = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if a != "model=tiny_bert"]
    out = lorabench("train", "method=lora", "model=minilm_l6", "dataset.eval_size=8", *args)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert [n for n in NOISE if n in text] == []
    assert "initialised from the seed (not in the checkpoint): classifier.bias, classifier.weight" in text
    assert "evaluate" not in out.stderr  # progress=false: no bar


def test_evaluation_and_calibration_show_progress_when_asked(sst2_dir, tmp_path):
    args = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if a != "progress=false"]
    out = lorabench("train", "method=eva", *args, "progress=true", "dataset.eval_batch_size=4")
    assert out.returncode == 0, out.stderr
    assert "evaluate:" in out.stderr and "/4 [" in out.stderr  # 16 dev sentences in batches of 4
    assert "calibrate:" in out.stderr  # EVA's init reads training batches
