"""Which runs are alive: owners, heartbeats, segments, and ``lorabench status``.

A trainer stamps its record with ``owner`` {pid, host, boot_id, pid_started, started_at,
heartbeat_at}. :class:`Recorder` refreshes ``heartbeat_at`` at every record write and, from a daemon
thread, every :data:`HEARTBEAT_S` seconds in between (rewriting the last written snapshot, never the
live record). :func:`run_state` turns a record into one of :data:`STATES`: a ``running`` record is
``stale`` when its owner is provably dead on this machine (no such process, a zombie, or a newer
process reusing the pid) or when its heartbeat is older than :data:`STALE_AFTER_S` (any machine).

Every start of a run id (first run or resume) is one entry of ``segments``: owner, start and end,
status, wall/init/train/eval seconds of that segment. A resumed run (``resume=auto``) carries the
previous record's segments, ``resumed_from`` list, history and train log over, so a resume that fails
destroys nothing; a segment that died without writing its record (SIGKILL, power loss) is closed as
``stale`` with its wall time estimated from its last heartbeat.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from lorabench.fingerprint import portable_strings
from lorabench.results.record import iter_records, json_text, now, write_text_atomic

HEARTBEAT_S = 30.0  # a live trainer rewrites its record at least this often
STALE_AFTER_S = 180.0  # a running record whose heartbeat is older than this has no live owner
STATES = ("running", "stale", "failed", "canceled", "completed")


# -- owners ---------------------------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def this_owner() -> dict:
    """Who this process is: enough to tell, later and from this machine, whether it still runs."""
    import psutil

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_started": psutil.Process().create_time(),
        "started_at": now(),
    }


def same_machine(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False
    return owner.get("boot_id") in (None, _boot_id())


def owner_alive(owner: dict) -> bool | None:
    """True/False for an owner on this machine; None when it is elsewhere (only its heartbeat tells)."""
    if not owner.get("pid") or not same_machine(owner):
        return None
    import psutil

    try:
        proc = psutil.Process(int(owner["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = owner.get("pid_started")
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _timestamp(stamp: str | None) -> float | None:
    try:
        return _dt.datetime.fromisoformat(stamp).timestamp() if stamp else None
    except (TypeError, ValueError):
        return None


def _seconds_since(stamp: str | None, now_ts: float) -> float | None:
    ts = _timestamp(stamp)
    return None if ts is None else now_ts - ts


def run_state(
    record: dict, path: Path | None = None, now_ts: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> tuple[str, str]:
    """(state, reason): the record's status, except that ``running`` without a live owner is ``stale``.

    Records written before owners were recorded fall back to the record file's modification time as
    their heartbeat."""
    status = record.get("status")
    if status != "running":
        return status, ""
    now_ts = time.time() if now_ts is None else now_ts
    owner = record.get("owner") or {}
    alive = owner_alive(owner)
    if alive is False:
        return "stale", f"owner pid {owner.get('pid')} on {owner.get('host')} is not running"
    age = _seconds_since(owner.get("heartbeat_at"), now_ts)
    if age is None and path is not None and Path(path).exists():
        age = now_ts - Path(path).stat().st_mtime
    if age is None:
        return "stale", "no owner or heartbeat recorded"
    if alive is None and age > stale_after_s:
        return "stale", f"no heartbeat for {age:.0f}s (owner on {owner.get('host', 'an unknown host')})"
    return "running", ""


# -- the live record ------------------------------------------------------------------------------
class Recorder:
    """Holds one run's record and writes it atomically (main process only). Each write stamps
    ``owner.heartbeat_at`` and ``progress.step`` (from :attr:`step`); :meth:`start_heartbeat`
    starts a daemon thread that rewrites the last written snapshot with a fresh heartbeat every
    ``heartbeat_s`` seconds, so long phases (loading, evaluation) keep the record alive too."""

    def __init__(self, path: Path, record: dict, enabled: bool, heartbeat_s: float | None = None):
        self.path, self.record, self.enabled = path, record, enabled
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.step = 0
        self._lock = threading.Lock()
        self._snapshot: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stamp(self, data: dict) -> None:
        data.setdefault("owner", {})["heartbeat_at"] = now()
        data.setdefault("progress", {})["step"] = self.step

    def write(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._stamp(self.record)
            self._snapshot = json_text(portable_strings(self.record))  # no path of this machine
            write_text_atomic(self.path, self._snapshot)

    def beat(self) -> None:
        """Rewrite the last snapshot with a fresh heartbeat (what the thread does)."""
        with self._lock:
            if self._snapshot is None:
                return
            data = json.loads(self._snapshot)
            self._stamp(data)
            write_text_atomic(self.path, json_text(data))

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except OSError as exc:  # a full disk must not kill the run; the next write retries
                print(f"[lorabench] WARNING heartbeat of {self.path} failed: {exc}", file=sys.stderr)

    def start_heartbeat(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorabench-heartbeat", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# -- segments -------------------------------------------------------------------------------------
SEGMENT_TIMERS = ("init_time_s", "train_time_s", "eval_time_s")


def _segments_of(previous: dict) -> list[dict]:
    """The previous record's segments, its open (died) segment closed as stale; a record written
    before segments existed becomes one segment."""
    segments = [dict(s) for s in previous.get("segments") or []]
    if not segments:
        cost = previous.get("cost") or {}
        segments = [
            {
                "owner": None,
                "started_at": previous.get("started_at"),
                "finished_at": previous.get("finished_at"),
                "status": previous.get("status"),
                "wall_time_s": cost.get("wall_time_s"),
                **{k: cost.get(k) for k in SEGMENT_TIMERS},
            }
        ]
    last = segments[-1]
    if last.get("status") == "running":  # its owner died before writing the end of its record
        beat = (previous.get("owner") or {}).get("heartbeat_at")
        start, end = _timestamp(last.get("started_at")), _timestamp(beat)
        last.update(
            status="stale",
            finished_at=beat,
            wall_time_s=None if start is None or end is None else end - start,
            wall_time_estimated=True,
            step=(previous.get("progress") or {}).get("step"),
        )
    return segments


def open_segment(record: dict, previous: dict | None, resume: bool) -> None:
    """Start this process's segment; with ``resume`` carry a previous unfinished record over."""
    segments, resumed = [], []
    if resume and previous and previous.get("status") != "completed":
        segments, resumed = _segments_of(previous), list(previous.get("resumed_from") or [])
        record["history"] = list(previous.get("history") or [])
        record["train_log"] = list(previous.get("train_log") or [])
    owner = record["owner"]
    segments.append(
        {
            "owner": {k: owner[k] for k in ("pid", "host")},
            "started_at": owner["started_at"],
            "finished_at": None,
            "status": "running",
        }
    )
    record["segments"], record["resumed_from"] = segments, resumed


def close_segment(record: dict, step: int, wall_time_s: float, timers: dict) -> None:
    """End this segment (at ``step``) and total the costs over all segments: ``wall_time_s``,
    ``init_time_s`` and ``eval_time_s`` are sums over segments (what the run cost); ``train_time_s`` is
    left to the caller (the training time of the steps the final model holds, restored from the
    checkpoint)."""
    segment = record["segments"][-1]
    error = record.get("error") or {}
    segment.update(
        finished_at=now(),
        status=record["status"],
        wall_time_s=wall_time_s,
        step=step,
        error={k: error[k] for k in ("type", "message") if k in error} or None,
        **{k: timers.get(k) for k in SEGMENT_TIMERS},
    )
    record["cost"]["wall_time_s"] = sum(s.get("wall_time_s") or 0.0 for s in record["segments"])
    for key in ("init_time_s", "eval_time_s"):
        record["cost"][key] = sum(s.get(key) or 0.0 for s in record["segments"])


# -- lorabench status -----------------------------------------------------------------------------
def _step(record: dict) -> str:
    step = (record.get("progress") or {}).get("step")
    if step is None:
        step = (record.get("error") or {}).get("step")
    if step is None and record.get("train_log"):
        step = record["train_log"][-1].get("step")
    total = ((record.get("config") or {}).get("train") or {}).get("max_steps")
    if step is None and record.get("status") == "completed":
        step = total
    return f"{'?' if step is None else step}/{'?' if total is None else total}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def list_runs(root: Path, now_ts: float | None = None) -> tuple[list[dict], list[tuple[Path, str]]]:
    """One row per readable record under ``root`` (state, run id, step, owner, age, reason), sorted by
    state (running first) then run id; and the (path, problem) of records that could not be used."""
    now_ts = time.time() if now_ts is None else now_ts
    rows, problems = [], []
    for path, record, problem in iter_records(root):
        if problem:
            problems.append((path, problem))
            continue
        state, reason = run_state(record, path, now_ts)
        owner = record.get("owner") or {}
        live = state in ("running", "stale")
        stamp = owner.get("heartbeat_at") if live else record.get("finished_at")
        age = _seconds_since(stamp, now_ts)
        if age is None:
            age = now_ts - path.stat().st_mtime
        rows.append(
            {
                "state": state,
                "run_id": record.get("run_id", path.parent.name),
                "step": _step(record),
                "owner": f"pid {owner['pid']} on {owner.get('host')}" if owner.get("pid") else "-",
                "age": _age(age) + (" since heartbeat" if live else " since end"),
                "reason": reason,
                "path": str(path),
            }
        )
    rows.sort(key=lambda r: (STATES.index(r["state"]) if r["state"] in STATES else len(STATES), r["run_id"]))
    return rows, problems


def format_runs(rows: list[dict]) -> str:
    header = {"state": "state", "run_id": "run id", "step": "step", "owner": "owner", "age": "age"}
    cols = list(header)
    table = [header, *rows]
    widths = {c: max(len(str(r[c])) for r in table) for c in cols}
    lines = [
        "  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() + (f"  ({r['reason']})" if r.get("reason") else "")
        for r in table
    ]
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def status_command(argv: list[str]) -> int:
    """``lorabench status``: the runs of a results folder by state, with step, owner and age."""
    parser = argparse.ArgumentParser(
        prog="lorabench status",
        description="Runs by state: running (live owner), stale (running, but its owner is gone), "
        "failed, canceled, completed; with step, owner and the age of the last heartbeat or the end.",
    )
    parser.add_argument("--results-dir", default="results/runs", help="folder searched for record.json files")
    parser.add_argument("--state", action="append", choices=STATES, help="show only these states (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        print(f"lorabench: error: --results-dir {args.results_dir!r} does not exist", file=sys.stderr)
        return 2
    rows, problems = list_runs(Path(args.results_dir))
    for path, problem in problems:
        print(f"lorabench: skipped {path}: {problem}", file=sys.stderr)
    rows = [r for r in rows if not args.state or r["state"] in args.state]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_runs(rows) if rows else f"no runs under {args.results_dir}")
    return 0
