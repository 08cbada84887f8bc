"""One live run per save directory: a lock file that both front ends take before training.

Two runs saving into one ``--save`` directory overwrite each other's checkpoints (and, in this
project's trainer, its ``metrics.jsonl``). So global rank 0 of every run creates
``SAVE/swiftmoe.lock`` at start, after the process group exists and before anything is written;
every rank agrees on the outcome, so a second run refuses on all ranks at once, naming the run
that owns the directory (host, process id, SLURM job id, start time, command) and the fix.

The lock works on a shared filesystem across nodes (NFS, Lustre, GPFS): it is created by a hard
link of a complete file to the lock name (atomic, and refused if the name exists, on every
POSIX filesystem, NFS included; ``O_EXCL`` is not atomic on old NFS clients). The owner's
rank 0 refreshes the lock's modification time every :data:`HEARTBEAT_S` seconds from a
background thread, and removes it when the process exits.

**When is the owner dead?** A lock is stale, and the next run takes it over with a notice, when

* its owner ran on this host (and in this process-id namespace: not another container) and that
  process no longer exists (process id, and its start time where ``/proc`` has it, so a reused
  id does not count as alive);
* its owner was an earlier incarnation of this SLURM job (same job id, lower
  ``SLURM_RESTART_COUNT``: SLURM has ended it before requeueing);
* or, on any host, its heartbeat is older than :data:`STALE_AFTER_S` seconds (300 by default, or
  ``SWIFTMOE_SAVE_LOCK_STALE_AFTER_S``; the owner records the timeout it promised). This compares
  the file's modification time (set by the file server) with this host's clock: the nodes'
  clocks must agree to well within that time, as NTP keeps them.

A run whose heartbeat stalled for longer than the timeout (a frozen process) may find its lock
taken over: before each save it checks that the lock is still its own and otherwise refuses to
save, so it never overwrites the new owner's checkpoints.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from megatron_swiftmoe.training.agreement import ExplainedError

LOCK_NAME = "swiftmoe.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = float(os.environ.get("SWIFTMOE_SAVE_LOCK_STALE_AFTER_S", 300))


class SaveDirectoryInUse(ExplainedError):
    """The save directory belongs to another live run (or was taken over by one)."""


def _process_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def _process_namespace() -> Optional[str]:
    """This boot and process-id namespace (Linux): where a process id means the same process.
    Containers that share a host name (host networking) differ here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _this_run() -> dict[str, Any]:
    env = os.environ
    return {
        "run_id": secrets.token_hex(8),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "process_namespace": _process_namespace(),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", 0) or 0),
        "started": time.time(),
        "command": " ".join(sys.argv)[:500],
        "heartbeat_s": HEARTBEAT_S,
        "stale_after_s": STALE_AFTER_S,
    }


def describe(owner: dict[str, Any], heartbeat_age: Optional[float] = None) -> str:
    """host, process, SLURM job, start time, last heartbeat, command of a lock's owner."""
    parts = [f"host {owner.get('host', '?')}", f"process id {owner.get('pid', '?')}"]
    if owner.get("slurm_job_id"):
        parts.append(f"SLURM job {owner['slurm_job_id']}")
    if isinstance(owner.get("started"), (int, float)):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])))
    if heartbeat_age is not None:
        parts.append(f"last heartbeat {heartbeat_age:.0f} s ago")
    described = ", ".join(parts)
    return described + (f"; command: {owner['command']}" if owner.get("command") else "")


def _read(path: Path) -> tuple[Optional[dict[str, Any]], Optional[float]]:
    """The lock's owner record and heartbeat age in seconds; (None, None) if there is no lock."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None, None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = {}
    return (owner if isinstance(owner, dict) else {}), max(0.0, time.time() - mtime)


def why_gone(owner: dict[str, Any], heartbeat_age: float, me: dict[str, Any]) -> Optional[str]:
    """Why the owner of a lock is gone, or None if it may be alive."""
    here = owner.get("host") == me["host"] and owner.get("process_namespace") == me["process_namespace"]
    if here and isinstance(owner.get("pid"), int):
        try:
            os.kill(owner["pid"], 0)
            started = owner.get("process_start")
            if started is not None and _process_start(owner["pid"]) not in (None, started):
                return f"its process {owner['pid']} no longer exists (the id now belongs to another process)"
        except ProcessLookupError:
            return f"its process {owner['pid']} on this host no longer exists"
        except PermissionError:
            pass  # alive, another user's
    job = owner.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and owner.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
        return f"it was an earlier incarnation of SLURM job {job}, which SLURM ended before requeueing it"
    stale_after = owner.get("stale_after_s", STALE_AFTER_S)
    if heartbeat_age > stale_after:
        return f"its heartbeat stopped {heartbeat_age:.0f} s ago (stale after {stale_after:.0f} s)"
    return None


class SaveLock:
    """The lock of one save directory, held by this process (global rank 0 of a run)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.me = _this_run()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a notice if a dead run's lock was taken over. Raises
        :class:`SaveDirectoryInUse` if a live run holds it (local: no collective)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        notice = None
        for _ in range(10):  # a few rounds of races with other starting runs
            if self._link():
                break
            owner, age = _read(self.path)
            if owner is None:
                continue  # released meanwhile: try again
            gone = why_gone(owner, age, self.me)
            if gone is None:
                raise SaveDirectoryInUse(self._in_use_message(owner, age))
            if self._break(owner):
                notice = (f"--save {self.directory}: taking over the lock of a run that is gone "
                          f"({describe(owner, age)}): {gone}")
        else:
            raise SaveDirectoryInUse(f"--save {self.directory}: could not take {self.path}: other runs keep "
                                     "taking it; start one run per save directory")
        self._thread = threading.Thread(target=self._heartbeat, name="swiftmoe-save-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return notice

    def _link(self) -> bool:
        """Create the lock with this run's record, if there is none (atomic)."""
        staging = self.directory / f".{LOCK_NAME}.{self.me['host']}.{self.me['pid']}.{self.me['run_id']}"
        staging.write_text(json.dumps(self.me, indent=1) + "\n")
        try:
            os.link(staging, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS may report a failure for a link whose reply was lost: the link count tells.
            if staging.stat().st_nlink == 2:
                return True
            raise
        finally:
            staging.unlink(missing_ok=True)

    def _break(self, owner: dict[str, Any]) -> bool:
        """Move a dead owner's lock aside (atomic: one of several starting runs wins)."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{self.me['run_id']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved, _ = _read(aside)
        if moved is not None and moved.get("run_id") != owner.get("run_id"):
            os.rename(aside, self.path)  # a live run took it in between: give it back
            return False
        aside.unlink(missing_ok=True)
        return True

    def _in_use_message(self, owner: dict[str, Any], age: Optional[float]) -> str:
        stale_after = owner.get("stale_after_s", STALE_AFTER_S)
        return (
            f"--save {self.directory} is in use by another run ({describe(owner, age)}). Two runs saving into "
            "one directory overwrite each other's checkpoints. Give this run another --save directory, or wait "
            f"until that run has ended. If it is gone (e.g. its node failed), its lock {self.path} is taken over "
            f"automatically once its heartbeat is older than {stale_after:.0f} s, or delete that file"
        )

    def owned(self) -> bool:
        owner, _ = _read(self.path)
        return owner is not None and owner.get("run_id") == self.me["run_id"]

    def verify(self) -> None:
        """Before a save: raise :class:`SaveDirectoryInUse` if another run took the lock over (a
        lock file deleted by hand is taken again)."""
        if self.owned():
            return
        if _read(self.path)[0] is None and self._link():
            return
        owner, age = _read(self.path)
        raise SaveDirectoryInUse(
            f"--save {self.directory}: this run no longer holds {self.path}, another run took it over "
            f"({describe(owner or {}, age)}) after this run's heartbeat stalled for more than "
            f"{self.me['stale_after_s']:.0f} s. Not saving, so as not to overwrite that run's checkpoints; "
            "restart this run with another --save directory"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.owned():
                    return
                os.utime(self.path)
            except OSError:
                pass  # a filesystem hiccup: try again at the next beat

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's (idempotent; only
        in the process that took it, not in a forked child)."""
        self._stop.set()
        try:
            if os.getpid() == self.me["pid"] and self.owned():
                self.path.unlink()
        except OSError:
            pass


def take_save_lock(directory: Optional[str], is_rank_zero: bool, log) -> Optional[SaveLock]:
    """Collective: rank 0 takes the lock of ``directory`` (if any); every rank raises the same
    :class:`~megatron_swiftmoe.training.agreement.AgreedError` if it cannot. ``log`` prints a notice."""
    from megatron_swiftmoe.training.agreement import agree

    if not directory:
        return None

    def take() -> Optional[SaveLock]:
        if not is_rank_zero:
            return None
        lock = SaveLock(directory)
        notice = lock.acquire()
        if notice:
            log(f"> {notice}")
        return lock

    return agree("taking the lock of the save directory", take)
