"""A failure on one rank ends the whole job, promptly, with one clear message: 2 and 3 CPU ranks.

Two launchers: ``torchrun`` (which stops the other ranks when one fails) and ``launch`` (one
process per rank, as ``srun`` starts them, with nobody to stop the others: each rank must end by
itself). Every run is bounded: a hang fails the test after TIMEOUT_S instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_swiftmoe.training.checkpointing import TRACKER, sha256_file
from tests.test_checkpointing import damage

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # a run still going after this is a hang: killed, and the test fails
BOUND_S = 120  # every failure below must end the job within this (they take seconds)
TINY = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2", "--swiftmoe-slots-per-rank", "3",
    "--lr", "1e-3", "--eval-iters", "0", "--no-progress", "--log-interval", "1", "--swiftmoe",
]
PROGRAM = ["-m", "megatron_swiftmoe.pretrain_gpt"]
INJECT = [str(ROOT / "tests" / "inject_fault.py")]


def tiny(ranks: int) -> list[str]:
    return [*TINY, "--num-experts", str(2 * ranks)]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


@dataclass
class Rank:
    returncode: int
    out: str  # stdout + stderr


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (torchrun then stops its workers, which run in sessions of their own), SIGKILL if need be."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _run(commands: list[list[str]], envs: list[dict[str, str]], logs: list[Path]) -> tuple[list[int], float]:
    """Start every command (output to its log file), wait for all; their exit codes and the wall time."""
    start = time.monotonic()
    processes = []
    for command, env, log in zip(commands, envs, logs):
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                              start_new_session=True))
    try:
        for process in processes:
            process.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        for process in processes:
            _stop(process)
        pytest.fail(f"hang: still running after {TIMEOUT_S}s:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
    return [process.returncode for process in processes], time.monotonic() - start


def launch(tmp_path: Path, ranks: int, *argv: str) -> tuple[list[Rank], float]:
    """Run ``python ARGV`` as ``ranks`` independent processes; every rank's result and the wall time."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs = [tmp_path / f"rank{r}_{time.monotonic_ns()}.log" for r in range(ranks)]
    envs = [_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port)) for r in range(ranks)]
    codes, elapsed = _run([[sys.executable, *argv]] * ranks, envs, logs)
    return [Rank(code, log.read_text()) for code, log in zip(codes, logs)], elapsed


def torchrun(tmp_path: Path, ranks: int, *argv: str) -> tuple[Rank, float]:
    """``torchrun --nproc-per-node RANKS ARGV``: its exit code and output, and the wall time."""
    log = tmp_path / f"torchrun_{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *argv]
    (code,), elapsed = _run([command], [_env()], [log])
    return Rank(code, log.read_text()), elapsed


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(ranks)``: a run of 4 iterations with checkpoints at 2 and 4, and its metrics."""
    runs: dict[int, tuple[Path, list[dict]]] = {}

    def get(ranks: int) -> tuple[Path, list[dict]]:
        if ranks not in runs:
            base = tmp_path_factory.mktemp(f"saved{ranks}")
            done, _ = torchrun(base, ranks, *PROGRAM, *tiny(ranks), "--train-iters", "4", "--save", str(base / "ckpt"),
                               "--save-interval", "2", "--metrics-path", str(base / "metrics.jsonl"))
            assert done.returncode == 0, done.out[-3000:]
            runs[ranks] = base / "ckpt", records(base / "metrics.jsonl")
        return runs[ranks]

    return get


def damaged_copy(saved_dir: Path, target: Path, victim: int, how: str) -> Path:
    """A copy of the checkpoints with rank ``victim``'s file of iteration 4 damaged; returns that file."""
    shutil.copytree(saved_dir, target)
    rank_file = target / "iter_0000004" / f"rank_{victim:05d}.pt"
    damage(rank_file, how)
    return rank_file


@pytest.mark.parametrize("how,problem", [("truncated", "is truncated"), ("deleted", "is missing"),
                                         ("checksum", "has a wrong checksum")])
@pytest.mark.parametrize("ranks", [2, 3])
def test_damaged_checkpoint_stops_every_rank(saved, tmp_path, ranks, how, problem):
    victim = ranks - 1
    rank_file = damaged_copy(saved(ranks)[0], tmp_path / "ckpt", victim, how)
    results, elapsed = launch(tmp_path, ranks, *PROGRAM, *tiny(ranks), "--train-iters", "6",
                              "--load", str(tmp_path / "ckpt"), "--metrics-path", str(tmp_path / "metrics.jsonl"))
    assert [r.returncode for r in results] == [1] * ranks, [r.out[-2000:] for r in results]
    assert elapsed < BOUND_S
    # The message, printed once (by rank 0), names the file, its rank and iteration, and the way out.
    named = f"{rank_file} (rank {victim}'s file of iteration 4) {problem}"
    assert [r.out.count(named) for r in results] == [1] + [0] * (ranks - 1), results[0].out[-3000:]
    assert "--load-fallback resumes from the newest older checkpoint" in results[0].out
    assert "Traceback" not in "".join(r.out for r in results)
    assert not (tmp_path / "metrics.jsonl").exists()  # no rank trained


@pytest.mark.parametrize("ranks", [2, 3])
def test_load_fallback_resumes_exactly_from_the_older_checkpoint(saved, tmp_path, ranks):
    saved_dir, whole = saved(ranks)
    damaged_copy(saved_dir, tmp_path / "ckpt", ranks - 1, "truncated")
    results, _ = launch(tmp_path, ranks, *PROGRAM, *tiny(ranks), "--train-iters", "4", "--load",
                        str(tmp_path / "ckpt"), "--load-fallback", "--metrics-path", str(tmp_path / "metrics.jsonl"))
    assert [r.returncode for r in results] == [0] * ranks, [r.out[-2000:] for r in results]
    assert "--load-fallback: skipping iteration 4" in results[0].out
    assert "loaded checkpoint" in results[0].out and "at iteration 2" in results[0].out
    resumed = records(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [3, 4]
    for key in ("lm_loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in whole[2:]], key


@pytest.mark.parametrize("ranks", [2, 3])
def test_exception_on_one_rank_ends_the_job_under_torchrun(tmp_path, ranks):
    done, elapsed = torchrun(tmp_path, ranks, *INJECT, str(ranks - 1), "2", "raise", "--", *tiny(ranks),
                             "--train-iters", "6", "--metrics-path", str(tmp_path / "metrics.jsonl"))
    assert done.returncode != 0 and elapsed < BOUND_S, done.out[-3000:]
    assert f"RuntimeError: injected fault on rank {ranks - 1} at iteration 2" in done.out


@pytest.mark.parametrize("ranks", [2, 3])
def test_exception_on_one_rank_ends_every_rank_without_a_launcher(tmp_path, ranks):
    """Nobody stops the other ranks: they notice the lost peer (or time out) and exit by themselves."""
    results, elapsed = launch(tmp_path, ranks, *INJECT, str(ranks - 1), "2", "raise", "--", *tiny(ranks),
                              "--train-iters", "6", "--distributed-timeout-minutes", "0.5",
                              "--metrics-path", str(tmp_path / "metrics.jsonl"))
    assert all(r.returncode != 0 for r in results) and elapsed < BOUND_S, [r.out[-2000:] for r in results]
    assert "RuntimeError: injected fault on rank" in results[-1].out
    for r in results[:-1]:
        assert "a collective operation failed" in r.out, r.out[-2000:]
    assert len(records(tmp_path / "metrics.jsonl")) == 2  # iterations 1 and 2 ran


def test_unresponsive_rank_ends_the_job_after_the_timeout(tmp_path):
    done, elapsed = torchrun(tmp_path, 2, *INJECT, "1", "2", "hang", "--", *tiny(2), "--train-iters", "6",
                             "--distributed-timeout-minutes", "0.25", "--metrics-path", str(tmp_path / "metrics.jsonl"))
    output = done.out
    assert done.returncode != 0 and elapsed < BOUND_S, output[-3000:]
    assert "rank 1 stops answering at iteration 2" in output
    assert "error: rank 0: a collective operation failed" in output and "--distributed-timeout-minutes (0.25)" in output
    assert elapsed > 15  # rank 0 waited for the timeout


# ---------------------------------------------------------------- non-finite gradients, two runs, a full disk


def finite_state(rank_file: Path) -> bool:
    """Every floating-point tensor of a saved rank state (model, optimizer shards) is finite."""
    state = torch.load(rank_file, map_location="cpu", weights_only=True)
    tensors = [t for t in [*state["model"].values(), *state["optimizer"]["masters"]]
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def test_nan_in_one_expert_gradient_stops_every_rank_before_the_step(tmp_path):
    save = tmp_path / "ckpt"
    results, elapsed = launch(tmp_path, 2, *INJECT, "1", "2", "nan", "--", *tiny(2), "--train-iters", "6",
                              "--save", str(save), "--save-interval", "2")
    assert [r.returncode for r in results] == [1, 1] and elapsed < BOUND_S, [r.out[-2000:] for r in results]
    stop = re.compile(r"error: non-finite gradients at iteration 3, found before the optimizer step: NaN or Inf in "
                      r"the expert gradients of rank 1: transformer layer 1, slot 0 \(expert \d+\): NaN\. Nothing of "
                      r"this iteration was stepped or saved")
    assert [len(stop.findall(r.out)) for r in results] == [1, 0], results[0].out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002"]
    assert all(finite_state(save / "iter_0000002" / f"rank_{r:05d}.pt") for r in range(2))
    assert [r["iteration"] for r in records(save / "metrics.jsonl")] == [1, 2]


def test_second_run_on_a_save_directory_refuses_and_the_first_finishes_intact(tmp_path):
    save, flags = tmp_path / "ckpt", [*tiny(2), "--train-iters", "4", "--save-interval", "2"]
    log = tmp_path / "first.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *INJECT,
               "0", "2", "pause", "--", *flags, "--save", str(save)]
    with open(log, "w") as out:  # rank 0 pauses when iteration 3 starts, after the save of iteration 2
        first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=_env(INJECT_FAULT_DIR=str(tmp_path)), start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "paused").exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        second, _ = torchrun(tmp_path, 2, *PROGRAM, *flags, "--save", str(save))
    finally:
        (tmp_path / "resume").touch()
        first.wait(timeout=TIMEOUT_S)
    pid = (tmp_path / "paused").read_text()
    assert second.returncode != 0
    owner = f"--save {save} is in use by another run (host {socket.gethostname()}, process id {pid}, started "
    assert second.out.count(owner) == 1, second.out[-3000:]
    assert "Give this run another --save directory" in second.out and " iteration " not in second.out
    assert first.returncode == 0, log.read_text()[-3000:]
    assert [r["iteration"] for r in records(save / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", "iter_0000004", TRACKER, "metrics.jsonl"]
    assert (save / TRACKER).read_text() == "4"


def test_out_of_space_while_saving_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    results, _ = launch(tmp_path, 2, *INJECT, "1", "4", "enospc", "--", *tiny(2), "--train-iters", "6",
                        "--save", str(save), "--save-interval", "2")
    assert [r.returncode for r in results] == [1, 1], [r.out[-2000:] for r in results]
    named = (f"writing the rank files failed on rank 1: cannot write {save / 'iter_0000004.tmp' / 'rank_00001.pt'}: "
             "No space left on device (ENOSPC)")
    assert [r.out.count(named) for r in results] == [1, 0], results[0].out[-3000:]
    assert f"The checkpoint of iteration 4 was not written; {save / TRACKER} still names the previous one" in results[0].out
    assert "Traceback" not in "".join(r.out for r in results)
    # The previous checkpoint verifies as a load verifies it: sizes and checksums, weights-only.
    assert (save / TRACKER).read_text() == "2"
    files = json.loads((save / "iter_0000002" / "metadata.json").read_text())["files"]
    for name, recorded in files.items():
        path = save / "iter_0000002" / name
        assert (path.stat().st_size, sha256_file(path)) == (recorded["bytes"], recorded["sha256"])
        assert finite_state(path)
