"""One trainer per run id: identical sweeps started at once share the work instead of repeating it.

Each run folder holds a file lock (``run.lock``) for the life of its run. A process that finds it
taken prints ``skip <run id>: another process (pid P on host H) is training it`` and moves on; one
that comes after the run completed skips the completed record. Checkpoints are staged in folders
unique per process, so ``checkpoint.every=1`` cannot collide either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.results.record import run_id
from lorabench.results.table import build_table
from lorabench.run_lock import RunLock
from lorabench.validate import build_run
from tests.conftest import compose, tiny_overrides

SWEEPS = 3
SEEDS = (0, 1)
TRAINING = re.compile(r"^\[lorabench\] training (\S+) \(pid (\d+) on host (\S+)\)", re.M)
LOCKED = re.compile(r"^\[lorabench\] skip (\S+): another process \(pid (\d+) on host (\S+)\) is training it", re.M)
DONE = re.compile(r"^\[lorabench\] skip (\S+): a completed record exists", re.M)


def records(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.rglob("record.json")}


def sweep_command(sst2_dir: Path, root: Path, *extra: str) -> list[str]:
    base = [a for a in tiny_overrides("classification", sst2_dir, root) if not a.startswith("train.max_steps")]
    seeds = ",".join(map(str, SEEDS))
    return [sys.executable, "-m", "lorabench.cli", "train", "-m", "method=lora", f"seed={seeds}", *base, *extra]


def test_identical_concurrent_sweeps_train_every_run_exactly_once(sst2_dir, tmp_path):
    cmd = sweep_command(sst2_dir, tmp_path, "train.max_steps=40", "checkpoint.every=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for _ in range(SWEEPS)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n=====\n".join(o[-3000:] for o in outputs)
    assert not any("Traceback" in o for o in outputs), outputs
    recs = records(tmp_path)
    assert len(recs) == len(SEEDS) and all(r["status"] == "completed" for r in recs.values())

    trained = [m.groups() for o in outputs for m in TRAINING.finditer(o)]
    locked = [m.groups() for o in outputs for m in LOCKED.finditer(o)]
    done = [m.group(1) for o in outputs for m in DONE.finditer(o)]
    # every run id trained once, by the process its record names; every other sweep skipped it
    assert Counter(rid for rid, _, _ in trained) == Counter({rid: 1 for rid in recs}), trained
    for rid, pid, host in trained:
        (segment,) = recs[rid]["segments"]
        assert segment["owner"] == {"pid": int(pid), "host": host} and segment["status"] == "completed"
        assert recs[rid]["owner"]["pid"] == int(pid)
    skips = Counter([rid for rid, _, _ in locked] + done)
    assert skips == Counter({rid: SWEEPS - 1 for rid in recs}), (locked, done)
    owners = {rid: pid for rid, pid, _ in trained}
    assert all(owners[rid] == pid for rid, pid, _ in locked)  # the skip names the process that trains it
    for o in outputs:
        assert "sweep summary" in o and "failed" not in o.split("sweep summary")[-1]
    print(
        f"\n[concurrency] {SWEEPS} sweeps x {len(SEEDS)} runs: trained {len(trained)}, skipped {len(locked)} "
        f"(locked) + {len(done)} (completed)"
    )

    assert not list(tmp_path.rglob(".staging*")) and not list(tmp_path.rglob("*.tmp"))
    assert not list(tmp_path.rglob("owner.json"))  # released
    text, problems = build_table(tmp_path)
    assert not problems and f"(n={len(SEEDS)})" in text


def run_dir_of(sst2_dir: Path, root: Path, *extra: str) -> Path:
    cfg, _ = build_run(compose(["method=lora", *tiny_overrides("classification", sst2_dir, root), *extra]))
    return root / run_id(dataclasses.asdict(cfg))


def test_a_run_owned_elsewhere_is_skipped_and_named(sst2_dir, tmp_path, capsys):
    run_dir = run_dir_of(sst2_dir, tmp_path)
    lock = RunLock(run_dir)
    assert lock.try_acquire()
    try:
        with pytest.raises(SystemExit) as exc:
            main(["train", "-m", "method=lora", "seed=0,1", *tiny_overrides("classification", sst2_dir, tmp_path)])
        assert exc.value.code == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    expected = f"[lorabench] skip {run_dir.name}: another process (pid {os.getpid()} on host {socket.gethostname()})"
    assert expected + " is training it" in out
    assert not (run_dir / "record.json").exists()  # nothing written into a run another process owns
    summary = out.split("sweep summary:")[1]
    assert re.search(rf"skipped\s+{re.escape(run_dir.name)}", summary) and "completed" in summary
    (other,) = records(tmp_path).values()  # the sweep's other run trained
    assert other["config"]["seed"] == 1 and other["status"] == "completed"
    # once released, the run trains
    with pytest.raises(SystemExit) as exc:
        main(["train", "method=lora", *tiny_overrides("classification", sst2_dir, tmp_path)])
    assert exc.value.code == 0 and records(tmp_path)[run_dir.name]["status"] == "completed"


def test_two_processes_share_one_lock_and_one_staging_folder(sst2_dir, tmp_path):
    """Under ``accelerate launch`` rank 0 takes the lock and every rank follows its answer: with the
    lock held elsewhere both ranks skip (none trains alone and hangs); once free, both train and save
    each checkpoint into one staging folder (both RNG files, one manifest)."""
    extra = ["hardware=cpu_ddp2", "hardware.micro_batch_size=1", "checkpoint.every=1"]
    run_dir = run_dir_of(sst2_dir, tmp_path, *extra)
    cmd = [sys.executable, "-m", "lorabench.cli", "train", "method=lora"]
    cmd += [*tiny_overrides("classification", sst2_dir, tmp_path), *extra]
    lock = RunLock(run_dir)
    assert lock.try_acquire()
    try:
        skipped = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert skipped.returncode == 0, (skipped.stdout + skipped.stderr)[-3000:]
    assert skipped.stdout.count("another process") == 1 and "training " + run_dir.name not in skipped.stdout
    assert not (run_dir / "record.json").exists()
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed" and record["hardware"]["num_processes"] == 2
    last = run_dir / "checkpoints" / "step_2"
    manifest = json.loads((last / "manifest.json").read_text())["files"]
    assert {"rng_0.pt", "rng_1.pt"} <= set(manifest) and not list(run_dir.rglob(".staging*"))


def test_a_run_completed_before_the_lock_was_taken_is_not_trained_again(sst2_dir, tmp_path, monkeypatch, capsys):
    """The race the re-read closes: a process reads the record (not completed yet), the owner
    finishes and releases the lock, the process takes it. It must read the record again and skip."""
    import lorabench.train as train_module

    args = ["train", "method=lora", *tiny_overrides("classification", sst2_dir, tmp_path)]
    with pytest.raises(SystemExit):
        main(args)
    (path,) = tmp_path.rglob("record.json")
    finished = json.loads(path.read_text())
    real_read, real_claim, claimed = train_module.existing_record, train_module.claim_run, []

    def claim(*args, **kwargs):  # the owner finished just before this process took the lock
        claimed.append(True)
        return real_claim(*args, **kwargs)

    def read(cfg_dict, results_dir):  # ... and every read before the lock saw it unfinished
        rid, record_path, record = real_read(cfg_dict, results_dir)
        return rid, record_path, record if claimed else None

    monkeypatch.setattr(train_module, "claim_run", claim)
    monkeypatch.setattr(train_module, "existing_record", read)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0 and claimed
    assert "a completed record exists" in capsys.readouterr().out
    assert json.loads(path.read_text()) == finished  # not trained (or written) again
