"""Chaos: one run SIGKILLed 20 times at random (seeded) steps, resumed each time, ends bitwise equal
to the run that was never interrupted (CPU).

``checkpoint.every=1``. The parent starts the run, waits until a checkpoint at or past a random
target step appears, sleeps a random 0-30 ms (so the kill lands anywhere in the next step: forward,
backward, optimizer step, checkpoint or record write) and sends SIGKILL. Nothing gets to clean up:
the record still says ``running`` (``run_state`` must call it stale), staging folders and temp files
may be left, the lock is dropped by the OS. Then ``resume=auto`` again, 20 times, then to the end.

    .venv/bin/python -m pytest -q -m slow tests/test_chaos.py -s     # prints its runtime
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorabench.checkpoint import list_checkpoints
from lorabench.results.runs import run_state
from tests.conftest import tiny_overrides

KILLS = 20
MAX_STEPS = 150  # room for 20 segments of 1-3 steps each plus the overshoot of each kill
SEED = 20
RUN = ["method=lora", f"train.max_steps={MAX_STEPS}", "checkpoint.every=1", "train.eval_every=25"]


def command(sst2_dir: Path, root: Path, *extra: str) -> list[str]:
    base = [a for a in tiny_overrides("classification", sst2_dir, root) if not a.startswith("train.max_steps")]
    return [sys.executable, "-m", "lorabench.cli", "train", *base, *RUN, *extra]


def popen(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every segment and in the reference
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def newest_step(run_dir: Path | None) -> int:
    if run_dir is None or not (run_dir / "checkpoints").is_dir():
        return 0
    steps = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    return max(steps, default=0)


def run_dir_under(root: Path) -> Path | None:
    found = [p.parent for p in root.glob("*/record.json")]
    return found[0] if found else None


def kill_at(proc: subprocess.Popen, root: Path, target: int, delay: float, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while newest_step(run_dir_under(root)) < target:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run exited ({proc.returncode}) before step {target}: {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint of step {target} within {timeout}s")
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_twenty_sigkills_at_random_steps_resume_to_the_uninterrupted_result(sst2_dir, tmp_path):
    t0 = time.perf_counter()
    reference = popen(command(sst2_dir, tmp_path / "a"))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    rng = random.Random(SEED)
    root, done, plan = tmp_path / "b", 0, []
    for kill in range(KILLS):
        target = done + rng.randint(1, 3)
        delay = rng.uniform(0.0, 0.03)
        proc = popen(command(sst2_dir, root, *(["resume=auto"] if kill else [])))
        kill_at(proc, root, target, delay)
        run_dir = run_dir_under(root)
        record = json.loads((run_dir / "record.json").read_text())
        assert record["status"] == "running" and run_state(record, run_dir / "record.json")[0] == "stale"
        done = newest_step(run_dir)
        assert done >= target and done < MAX_STEPS, (kill, target, done)
        plan.append((target, done))
    final = popen(command(sst2_dir, root, "resume=auto"))
    assert final.wait(timeout=600) == 0, final.stderr.read()[-3000:]
    runtime = time.perf_counter() - t0

    a_dir, b_dir = run_dir_under(tmp_path / "a"), run_dir_under(root)
    a, b = (json.loads((d / "record.json").read_text()) for d in (a_dir, b_dir))
    assert b["status"] == "completed", b.get("error")
    resumes = b["resumed_from"]
    assert len(resumes) == KILLS, [r["step"] for r in resumes]  # one entry per resume
    assert [r["step"] for r in resumes] == sorted({r["step"] for r in resumes})  # each resume went further
    assert [r["step"] for r in resumes][-1] == plan[-1][1]
    assert all(r["verified"] and r["skipped"] == [] for r in resumes)  # atomic saves: no broken checkpoint
    assert [s["status"] for s in b["segments"]] == ["stale"] * KILLS + ["completed"]
    assert b["cost"]["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] or 0.0 for s in b["segments"]))
    # the uninterrupted run's result, bitwise
    assert a["history"] == b["history"] and len(a["history"]) == MAX_STEPS // 25
    assert a["train_log"] == b["train_log"] and a["metrics"]["final"] == b["metrics"]["final"]
    assert a["method_report"] == b["method_report"]
    assert same_tensors(load_file(str(a_dir / "adapter.safetensors")), load_file(str(b_dir / "adapter.safetensors")))
    last_a, last_b = list_checkpoints(a_dir)[-1], list_checkpoints(b_dir)[-1]
    assert last_a.name == last_b.name == f"step_{MAX_STEPS}"
    opt_a, opt_b = (torch.load(p / "optimizer.pt", weights_only=True) for p in (last_a, last_b))
    assert same_tensors(
        {f"{k}.{n}": v for k, s in opt_a["state"].items() for n, v in s.items()},
        {f"{k}.{n}": v for k, s in opt_b["state"].items() for n, v in s.items()},
    )
    assert not list(b_dir.rglob(".staging*")) and not list(b_dir.glob(".*.tmp"))  # leftovers cleaned up
    print(
        f"\n[chaos] {KILLS} SIGKILLs at (target, reached) steps {plan}; resumed to step {MAX_STEPS} "
        f"bitwise equal; runtime {runtime:.0f}s"
    )
