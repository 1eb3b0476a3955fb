"""Records never claim ``running`` without a live owner.

A record names its owner (pid, host, boot, process start) and carries a heartbeat; ``run_state``
calls a ``running`` record ``stale`` when that owner is gone (dead or reused pid on this machine, or
a heartbeat older than the timeout from another machine). ``lorabench status`` lists runs by state
and ``lorabench table`` counts stale runs. SIGKILL, two quick SIGTERMs, a second signal while
checkpointing and a tracker that fails to start all leave a record that tells the truth.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorabench.trackers as trackers
import lorabench.train as train_module
from lorabench.cli import main
from lorabench.results.record import SCHEMA_VERSION, now, write_json_atomic
from lorabench.results.runs import STALE_AFTER_S, Recorder, run_state, this_owner
from lorabench.results.table import build_table
from tests.conftest import tiny_overrides

LONG = ["train.max_steps=200", "train.log_every=5"]  # a few seconds: long enough to catch it running


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code


def stamp(seconds_ago: float) -> str:
    import datetime as dt

    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_record(root: Path, name: str, status: str, owner: dict | None = None, step: int | None = 3) -> Path:
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": name,
        "status": status,
        "error": {"type": "X", "message": "m", "step": step} if status in ("failed", "canceled") else None,
        "finished_at": None if status == "running" else stamp(60),
        "config": {"seed": 0, "method": {"label": "lora"}, "dataset": {"name": "sst2"}, "model": {"name": "tiny"}},
        "config_hash": name,
        "method": {"label": "lora"},
        "model": {"name": "tiny"},
        "dataset": {"name": "sst2", "version": "1", "source": {"kind": "local", "path": "/d"}},
        "metrics": {"primary": "accuracy", "higher_is_better": True, "report": "last", "final": {"accuracy": 0.5}},
        "cost": {},
        "hardware": {},
        "provenance": {},
        "progress": {"step": step, "max_steps": 10},
    }
    record["config"]["train"] = {"max_steps": 10}
    if owner is not None:
        record["owner"] = owner
    path = root / name / "record.json"
    write_json_atomic(path, record)
    return path


# -- classification -------------------------------------------------------------------------------------
def test_run_state_tells_live_owners_from_gone_ones(tmp_path):
    me = this_owner()
    fresh, silent = stamp(1), stamp(STALE_AFTER_S + 60)
    cases = {
        "this process": ({**me, "heartbeat_at": fresh}, "running"),
        "this process, heartbeat late": ({**me, "heartbeat_at": silent}, "running"),  # alive is alive
        "dead pid here": ({**me, "pid": dead_pid(), "heartbeat_at": fresh}, "stale"),
        "pid reused by another process": (
            {**me, "pid_started": me["pid_started"] - 100, "heartbeat_at": fresh},
            "stale",
        ),
        "other host, beating": ({**me, "host": "elsewhere", "heartbeat_at": fresh}, "running"),
        "other host, silent": ({**me, "host": "elsewhere", "heartbeat_at": silent}, "stale"),
        "this host rebooted, silent": ({**me, "boot_id": "another-boot", "heartbeat_at": silent}, "stale"),
    }
    for what, (owner, expected) in cases.items():
        state, reason = run_state({"status": "running", "owner": owner})
        assert state == expected, (what, reason)
        assert bool(reason) == (expected == "stale"), what
    # records written before owners were recorded: the file's age is their heartbeat
    legacy = make_record(tmp_path, "legacy", "running")
    assert run_state(json.loads(legacy.read_text()), legacy)[0] == "running"
    old = time.time() - STALE_AFTER_S - 60
    os.utime(legacy, (old, old))
    assert run_state(json.loads(legacy.read_text()), legacy)[0] == "stale"
    assert run_state({"status": "running"})[0] == "stale"  # no owner, no file: nobody can be running it
    for status in ("completed", "failed", "canceled"):
        assert run_state({"status": status, "owner": {**me, "pid": dead_pid()}}) == (status, "")


def test_heartbeat_rewrites_the_last_written_record(tmp_path):
    path = tmp_path / "record.json"
    record = {"status": "running", "owner": this_owner()}
    recorder = Recorder(path, record, enabled=True, heartbeat_s=0.05)
    recorder.write()
    first = json.loads(path.read_text())["owner"]["heartbeat_at"]
    recorder.step = 7
    record["not_written_yet"] = True  # the thread rewrites the snapshot, never the live dict
    recorder.start_heartbeat()
    deadline = time.monotonic() + 5
    while json.loads(path.read_text())["owner"]["heartbeat_at"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    recorder.stop_heartbeat()
    beat = json.loads(path.read_text())
    assert beat["owner"]["heartbeat_at"] > first and beat["progress"]["step"] == 7
    assert "not_written_yet" not in beat and beat["status"] == "running"
    mtime = path.stat().st_mtime_ns
    time.sleep(0.3)
    assert path.stat().st_mtime_ns == mtime  # stopped
    assert not list(tmp_path.glob(".*.tmp"))


# -- lorabench status / table ---------------------------------------------------------------------------
@pytest.fixture
def mixed(tmp_path) -> Path:
    me = {**this_owner(), "heartbeat_at": now()}
    make_record(tmp_path, "r-live", "running", me)
    make_record(tmp_path, "r-killed", "running", {**me, "pid": dead_pid()}, step=4)
    make_record(tmp_path, "r-done", "completed", me, step=10)
    make_record(tmp_path, "r-broke", "failed", me, step=2)
    make_record(tmp_path, "r-stopped", "canceled", me, step=5)
    return tmp_path


def test_status_lists_runs_by_state(mixed, capsys):
    assert cli("status", "--results-dir", str(mixed)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["state", "run", "id", "step", "owner", "age"]
    rows = [line.split()[:3] for line in lines[1:-1]]
    assert rows == [
        ["running", "r-live", "3/10"],
        ["stale", "r-killed", "4/10"],
        ["failed", "r-broke", "2/10"],
        ["canceled", "r-stopped", "5/10"],
        ["completed", "r-done", "10/10"],
    ]
    assert f"pid {os.getpid()} on" in lines[1] and "since heartbeat" in lines[1] and "since end" in lines[5]
    assert "is not running" in lines[2]  # the reason a running record is stale
    assert lines[-1] == "5 runs: 1 running, 1 stale, 1 failed, 1 canceled, 1 completed"
    assert cli("status", "--results-dir", str(mixed), "--state", "stale", "--json") == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["run_id"] == "r-killed" and row["state"] == "stale"
    assert cli("status", "--results-dir", str(mixed / "nowhere")) == 2


def test_table_counts_stale_runs_apart_from_running_ones(mixed):
    text, problems = build_table(mixed)
    assert not problems
    assert "Not shown: 1 canceled, 1 failed, 1 running, 1 stale runs." in text


# -- what interrupted runs leave behind -----------------------------------------------------------------
def start(sst2_dir: Path, root: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "lorabench.cli",
        "train",
        "method=lora",
        *tiny_overrides("classification", sst2_dir, root),
    ]
    return subprocess.Popen(
        [*cmd, *LONG, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_step(root: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> tuple[Path, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        for path in root.glob("*/record.json"):  # not rglob: checkpoint staging folders come and go
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            if (record.get("progress") or {}).get("step", 0) >= step:
                return path, record
        time.sleep(0.01)
    raise AssertionError(f"no record reached step {step} in {timeout}s")


def test_sigkilled_run_is_stale_and_its_resume_keeps_the_lost_segment(sst2_dir, tmp_path, capsys):
    proc = start(sst2_dir, tmp_path)
    path, record = wait_for_step(tmp_path, 2, proc)
    assert record["owner"]["pid"] == proc.pid and run_state(record, path) == ("running", "")
    proc.kill()
    proc.wait()
    record = json.loads(path.read_text())
    state, reason = run_state(record, path)
    assert record["status"] == "running" and state == "stale" and f"pid {proc.pid}" in reason
    last_beat = record["owner"]["heartbeat_at"]
    assert cli("status", "--results-dir", str(tmp_path)) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("stale")
    # the run starts over (no checkpoints) and keeps the killed segment, closed from its heartbeat
    resumed = start(sst2_dir, tmp_path, "resume=auto")
    out = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, out[-3000:]
    record = json.loads(path.read_text())
    lost, done = record["segments"]
    assert lost["status"] == "stale" and lost["wall_time_estimated"] and lost["owner"]["pid"] == proc.pid
    assert lost["finished_at"] == last_beat and lost["wall_time_s"] >= 0
    assert done["status"] == "completed" and done["owner"]["pid"] == resumed.pid
    assert record["cost"]["wall_time_s"] == pytest.approx(lost["wall_time_s"] + done["wall_time_s"])
    assert run_state(record, path) == ("completed", "")


def test_two_sigterms_30ms_apart_leave_a_canceled_record(sst2_dir, tmp_path):
    proc = start(sst2_dir, tmp_path, "checkpoint.every=1")
    path, _ = wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.03)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode in (130, -signal.SIGTERM), out[-3000:]
    record = json.loads(path.read_text())
    assert record["status"] == "canceled" and record["error"]["type"] == "RunCanceled", record["error"]
    assert record["segments"][-1]["status"] == "canceled"
    assert not list(path.parent.rglob(".staging*")) and not list(path.parent.glob(".*.tmp"))


def test_second_signal_while_checkpointing_still_records_canceled(sst2_dir, tmp_path, monkeypatch):
    """The first SIGTERM (after step 2) asks for a checkpoint; a second one during that checkpoint
    stops at once: no checkpoint of step 2, no staging left, and the record says canceled."""
    real_save = train_module.save_checkpoint

    def interrupted_save(run_dir, step, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(run_dir, step, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", interrupted_save)
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "2")
    args = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if not a.startswith("train.max_steps")]
    assert cli("train", "method=lora", *args, "train.max_steps=4", "checkpoint.every=3") == 130
    (path,) = tmp_path.rglob("record.json")
    record = json.loads(path.read_text())
    assert record["status"] == "canceled" and "again" in record["error"]["message"]
    assert record["error"]["step"] == 2
    assert not list(path.parent.rglob("step_*")) and not list(path.parent.rglob(".staging*"))


def test_tracker_that_fails_to_start_leaves_a_failed_record(sst2_dir, tmp_path, monkeypatch, capsys):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("api_key not configured (no-tty); call wandb.login()")

    monkeypatch.setattr(trackers.WandbTracker, "__init__", refuse)
    assert cli("train", "method=lora", "tracker=wandb", *tiny_overrides("classification", sst2_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "tracker='wandb' failed to start" in err and "api_key" in err and "Traceback" not in err
    (path,) = tmp_path.rglob("record.json")
    record = json.loads(path.read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "TrackerError"
    assert "tracker='wandb' failed to start: RuntimeError: api_key" in record["error"]["message"]
    assert run_state(record, path)[0] == "failed"
