"""One trainer per run id, across processes and machines that share a results folder.

:class:`RunLock` holds an OS file lock (``filelock.FileLock``: ``flock``, which NFS forwards to the
server's lock manager; filelock falls back to a soft lock where a filesystem lacks it) on
``<run_dir>/run.lock`` for the whole life of a run. The OS drops the lock when its holder dies, also
by SIGKILL, so a crashed trainer never blocks the next one. The holder writes ``owner.json`` beside
it (pid, host, start time) so that a process that finds the lock taken can say who holds it; it is
removed on release. The lock file itself stays in place: removing it would let two processes lock two
different files of the same name.

Under multi-process Accelerate only rank 0 takes the lock; :func:`claim_run` sends its
answer to every rank, so all ranks train the run or all skip it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from lorabench.results.record import write_json_atomic
from lorabench.results.runs import this_owner

LOCK_NAME = "run.lock"
OWNER_NAME = "owner.json"


class RunLock:
    """A non-blocking lock on one run folder; ``holder()`` says who owns it."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK_NAME))

    def try_acquire(self) -> bool:
        """True when this process now owns the run (and has written ``owner.json``)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)  # one attempt: never wait for another trainer
        except Timeout:
            return False
        for leftover in self.run_dir.glob(".*.json.*.tmp"):  # temp files of writers that died mid-write
            leftover.unlink(missing_ok=True)
        write_json_atomic(self.run_dir / OWNER_NAME, this_owner())
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()

    def holder(self, wait_s: float = 1.0) -> dict | None:
        """The owner recorded by the process holding the lock (it writes it just after locking, so
        this waits up to ``wait_s`` for it), or None if it cannot be read."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return json.loads((self.run_dir / OWNER_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)


def describe_holder(owner: dict | None) -> str:
    if not owner:
        return "owner not recorded"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"


@dataclass
class RunClaim:
    """The answer of :func:`claim_run`, the same on every rank: ``owned`` (this process group trains
    the run) or ``holder`` (who does). ``lock`` is set on rank 0 of an owning group only."""

    owned: bool
    holder: dict | None = None
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def claim_run(run_dir: Path, accelerator) -> RunClaim:
    """Rank 0 tries the run's lock without waiting and broadcasts the outcome to the other ranks."""
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    decision: list = [None]
    if lock is not None:
        owned = lock.try_acquire()
        decision = [(owned, None if owned else (lock.holder() or {}))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decision = broadcast_object_list(decision, from_process=0)
    owned, holder = decision[0]
    return RunClaim(owned, holder, lock if owned else None)
