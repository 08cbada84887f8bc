"""Checkpoint writes are atomic; bad checkpoints fail with a clear reason, the same on every rank."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torch.distributed as dist

from megatron_swiftmoe.training import savelock
from megatron_swiftmoe.training.agreement import AgreedError
from megatron_swiftmoe.training.checkpointing import (
    MUST_MATCH,
    TRACKER,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from tests.distributed import run_distributed

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only


def _args(**overrides) -> argparse.Namespace:
    settings = {name: 1 for name in MUST_MATCH}
    settings.update(swiftmoe=True, moe_layer_freq=[1, 1], world_size=1)
    settings.update(overrides)
    return argparse.Namespace(**settings)


class FailsHalfwayThroughPickling:
    """Stands for a rank dying while its file is being written."""

    def __reduce__(self):
        raise RuntimeError("killed while writing")


def interrupted_save_worker(rank: int, world_size: int, root: str) -> dict:
    args = _args(world_size=world_size)
    save_checkpoint(root, 10, args, {"weights": torch.arange(1000.0) + rank})
    try:  # the last rank dies while writing its file; the others write theirs
        dying = {"boom": FailsHalfwayThroughPickling()} if rank == world_size - 1 else {}
        save_checkpoint(root, 20, args, {"weights": torch.zeros(100_000), **dying})
        failure = None
    except AgreedError as error:
        failure = str(error)
    iteration, state = load_checkpoint(root, args)
    leftovers = sorted(p.name for p in Path(root).iterdir())
    save_checkpoint(root, 30, args, {"weights": torch.ones(3)})  # the next good save cleans up
    return dict(iteration=iteration, weights=state["weights"], leftovers=leftovers, failure=failure,
                after=sorted(p.name for p in Path(root).iterdir()), latest=latest_iteration(root))


@pytest.mark.parametrize("world_size", [1, 2])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, world_size):
    root = tmp_path / "ckpt"
    r = run_distributed(interrupted_save_worker, world_size, str(root), tmp_path=tmp_path)
    assert r["failure"] is not None and f"failed on rank {world_size - 1}" in r["failure"]
    assert "killed while writing" in r["failure"]  # rank 0 raised the last rank's error
    assert r["iteration"] == 10
    assert torch.equal(r["weights"], torch.arange(1000.0))
    assert "iter_0000020.tmp" in r["leftovers"] and "iter_0000020" not in r["leftovers"]
    assert r["latest"] == 30
    assert r["after"] == ["iter_0000010", "iter_0000030", TRACKER]


def resave_worker(rank: int, world_size: int, root: str) -> dict:
    save_checkpoint(root, 5, _args(), {"weights": torch.zeros(3)})
    save_checkpoint(root, 5, _args(), {"weights": torch.ones(3)})  # e.g. a --finetune run saving into --load
    iteration, state = load_checkpoint(root, _args())
    return dict(iteration=iteration, weights=state["weights"], names=sorted(p.name for p in Path(root).iterdir()))


def test_resaving_an_iteration_replaces_it(tmp_path):
    r = run_distributed(resave_worker, 1, str(tmp_path / "ckpt"), tmp_path=tmp_path)
    assert r["iteration"] == 5 and torch.equal(r["weights"], torch.ones(3))
    assert r["names"] == ["iter_0000005", TRACKER]


def _load_message(root: Path, args=None, **kwargs) -> str | None:
    try:
        load_checkpoint(root, args or _args(), **kwargs)
        return None
    except AgreedError as error:
        return str(error)


def bad_checkpoint_worker(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    messages = {}
    save_checkpoint(root, 5, _args(), {"weights": torch.ones(2)})
    messages["other_shape"] = _load_message(root, _args(hidden_size=2, world_size=2), fallback=True)
    rank_file = root / "iter_0000005" / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:40])
    messages["truncated"] = _load_message(root)
    (root / TRACKER).write_text("five")
    messages["bad_tracker"] = _load_message(root)
    messages["bad_tracker_fallback"] = _load_message(root, fallback=True)
    messages["empty_dir"] = load_checkpoint(root / "nothing", _args())
    return messages


def test_bad_checkpoints_fail_clearly(tmp_path):
    m = run_distributed(bad_checkpoint_worker, 1, str(tmp_path / "ckpt"), tmp_path=tmp_path)
    assert "hidden_size: checkpoint 1 vs now 2" in m["other_shape"]
    assert "world_size: checkpoint 1 vs now 2" in m["other_shape"]
    assert "fallback" not in m["other_shape"]  # another run's directory: falling back cannot help
    assert "rank_00000.pt (rank 0's file of iteration 5) is truncated" in m["truncated"]
    assert "corrupt" in m["truncated"] and "no older checkpoint" in m["truncated"]
    assert "corrupt" in m["bad_tracker"] and "--load-fallback" in m["bad_tracker"]
    # The fallback tries iteration 5's directory, whose file is still truncated.
    assert "no complete checkpoint verifies" in m["bad_tracker_fallback"]
    assert "iteration 5" in m["bad_tracker_fallback"] and "truncated" in m["bad_tracker_fallback"]
    assert m["empty_dir"] is None


def damage(path: Path, how: str) -> None:
    """Damage a checkpoint file: ``truncated``, ``deleted``, or one byte flipped (``checksum``)."""
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "deleted":
        path.unlink()
    else:  # one flipped byte: same size, wrong checksum
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


DAMAGES = {"truncated": "is truncated", "deleted": "is missing", "checksum": "wrong checksum"}


def damaged_rank_file_worker(rank: int, world_size: int, root: str) -> dict:
    """For each damage of the last rank's newest file: every rank's error, and what --load-fallback loads."""
    pristine, args, victim = Path(root) / "pristine", _args(world_size=world_size), world_size - 1
    for iteration in (2, 4):
        save_checkpoint(pristine, iteration, args, {"weights": torch.full((1000,), 100.0 * rank + iteration)})
    results = {}
    for how in DAMAGES:
        copy = Path(root) / how
        if rank == 0:
            shutil.copytree(pristine, copy)
            damage(copy / "iter_0000004" / f"rank_{victim:05d}.pt", how)
        dist.barrier()
        strict = _load_message(copy, args)
        iteration, state = load_checkpoint(copy, args, fallback=True)
        seen: list = [None] * world_size
        dist.all_gather_object(seen, (strict, iteration, float(state["weights"][0])))
        results[how] = seen
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_damaged_rank_file_fails_on_every_rank(tmp_path, world_size):
    results = run_distributed(damaged_rank_file_worker, world_size, str(tmp_path), tmp_path=tmp_path)
    victim = world_size - 1
    for how, seen in results.items():
        message = seen[0][0]
        assert all(strict == message for strict, _, _ in seen), (how, "every rank raises the same error")
        assert f"iter_0000004/rank_{victim:05d}.pt (rank {victim}'s file of iteration 4)" in message, how
        assert DAMAGES[how] in message, how
        assert "--load-fallback resumes from the newest older checkpoint" in message, how
        assert "iterations here: 2" in message, how
        # --load-fallback: every rank resumes from iteration 2, with its own state.
        assert [(i, w) for _, i, w in seen] == [(2, 100.0 * r + 2) for r in range(world_size)], how


class RunsCode:
    """A pickle whose loading runs code (here: it creates a file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def code_running_pickle_worker(rank: int, world_size: int, root: str, marker: str) -> dict:
    # Saved by our own save_checkpoint: the size and checksum in metadata.json are right.
    save_checkpoint(root, 3, _args(), {"weights": torch.ones(2), "payload": RunsCode(Path(marker))})
    return dict(message=_load_message(Path(root)), ran_during_load=os.path.exists(marker))


def test_code_running_pickle_is_refused(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "marker"
    r = run_distributed(code_running_pickle_worker, 1, str(root), str(marker), tmp_path=tmp_path)
    assert r["message"] is not None and "refusing to load" in r["message"]
    assert "rank_00000.pt (rank 0's file of iteration 3)" in r["message"]
    assert "Unsupported global: GLOBAL exec" in r["message"] and "weights_only" not in r["message"]
    assert not r["ran_during_load"] and not marker.exists()
    # The payload is live: an unrestricted unpickler runs it.
    torch.load(root / "iter_0000003" / "rank_00000.pt", weights_only=False)
    assert marker.read_text() == "ran"


# ---------------------------------------------------------------- the save-directory lock


def _lock_record(directory: Path, **owner) -> Path:
    path = directory / savelock.LOCK_NAME
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": "other", "host": "node-a", "pid": 1, "started": 0.0, **owner}))
    return path


def test_save_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(savelock, "HEARTBEAT_S", 0.05)
    owner = savelock.SaveLock(tmp_path / "live")
    assert owner.acquire() is None
    with pytest.raises(savelock.SaveDirectoryInUse) as refused:  # the same host, a live process
        savelock.SaveLock(tmp_path / "live").acquire()
    assert (f"--save {tmp_path / 'live'} is in use by another run (host {socket.gethostname()}, process id "
            f"{os.getpid()}, SLURM job 4242, started ") in str(refused.value)
    assert f"or delete that file" in str(refused.value) and "older than 300 s" in str(refused.value)
    beat = owner.path.stat().st_mtime
    os.utime(owner.path, (beat - 100, beat - 100))
    time.sleep(0.5)
    assert owner.path.stat().st_mtime > beat - 50  # the heartbeat refreshed it
    owner.verify()
    owner.release()
    assert not owner.path.exists()

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    cases = {  # lock record -> why its owner is gone (None: alive)
        "same_host_dead": (dict(host=socket.gethostname(), pid=dead_pid,
                                process_namespace=savelock._process_namespace()), f"its process {dead_pid} on this host"),
        "other_container_same_name": (dict(host=socket.gethostname(), pid=dead_pid, process_namespace="other"), None),
        "other_host_fresh": (dict(host="node-a"), None),
        "other_host_stale": (dict(host="node-a", stale_after_s=60.0), "its heartbeat stopped"),
        "slurm_requeued": (dict(host="node-a", slurm_job_id="4242", slurm_restart_count=0), "earlier incarnation"),
    }
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for name, (record, gone) in cases.items():
        path = _lock_record(tmp_path / name, **record)
        if name == "other_host_stale":
            os.utime(path, (time.time() - 61, time.time() - 61))
        lock = savelock.SaveLock(tmp_path / name)
        if gone is None:
            with pytest.raises(savelock.SaveDirectoryInUse, match=f"host {record['host']}, process id {record.get('pid', 1)}"):
                lock.acquire()
            continue
        notice = lock.acquire()
        assert notice.startswith(f"--save {tmp_path / name}: taking over the lock of a run that is gone (host "), name
        assert gone in notice, (name, notice)
        assert lock.owned() and sorted(p.name for p in (tmp_path / name).iterdir()) == [savelock.LOCK_NAME], name
        lock.release()


def test_save_lock_lost_to_another_run_refuses_to_save(tmp_path):
    lock = savelock.SaveLock(tmp_path)
    lock.acquire()
    lock.path.unlink()  # removed by hand: taken again
    lock.verify()
    assert lock.owned()
    _lock_record(tmp_path, host="node-b", pid=77)  # another run took it over (this one seemed dead)
    with pytest.raises(savelock.SaveDirectoryInUse) as lost:
        lock.verify()
    assert "this run no longer holds" in str(lost.value) and "host node-b, process id 77" in str(lost.value)
    assert "Not saving" in str(lost.value)
    lock.release()  # not ours: left in place
    assert json.loads(lock.path.read_text())["pid"] == 77
