"""Faults in Megatron-LM's own ``pretrain_gpt.py`` with ``--swiftmoe``, on 2 CPU ranks: a NaN in one
expert gradient, two runs on one save directory, damaged checkpoints, a full disk.

Runs are shared: the first run of the two-runs case saves the torch-format checkpoints the
layout and damage cases load; the NaN run saves the torch_dist checkpoints the truncated-file
case loads. Faults are injected by ``tests/megatron_lm_fault.py`` (see there).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.megatron_lm import CPU_FLAGS, REPO, TIMEOUT_S, Run, environment, launch, tiny_moe

SWIFTMOE = ["--swiftmoe", "--swiftmoe-slots-per-rank", "3"]
TRACKER = "latest_checkpointed_iteration.txt"


def fault_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(REPO / "tests" / "megatron_lm_fault.py"), *CPU_FLAGS, *flags]


def fault_environment(tree: Path, fault: str, folder: Path) -> dict[str, str]:
    return {**environment(tree), "SWIFTMOE_TEST_FAULT": fault, "SWIFTMOE_TEST_FAULT_DIR": str(folder)}


def with_fault(tree: Path, fault: str, folder: Path, *flags: str) -> Run:
    done = subprocess.run(fault_command(*flags), cwd=tree, env=fault_environment(tree, fault, folder),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return Run(done.returncode, done.stdout + done.stderr)


def iterations_logged(run: Run) -> list[int]:
    return [int(i) for i in re.findall(r"iteration\s+(\d+)/\s*\d+ \|", run.output)]


# ---------------------------------------------------------------- two runs, one --save directory


@pytest.fixture(scope="module")
def two_runs(tree, tmp_path_factory):
    """Run A saves (torch format) at iterations 2 and 3 and pauses at the start of iteration 3;
    meanwhile run B starts on the same --save directory. Returns A, B, the directory, A's rank 0 pid."""
    folder = tmp_path_factory.mktemp("two_runs")
    save = folder / "ckpt"
    flags = [*tiny_moe(**{"train-iters": 3}), *SWIFTMOE, "--ckpt-format", "torch", "--save", str(save),
             "--save-interval", "2"]
    log = folder / "a.log"
    with open(log, "w") as out:
        first = subprocess.Popen(fault_command(*flags), cwd=tree, env=fault_environment(tree, "pause:0:3", folder),
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (folder / "paused").exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.5)
        second = launch(tree, 2, *flags)
    finally:
        (folder / "resume").touch()
        first.wait(timeout=TIMEOUT_S)
    return Run(first.returncode, log.read_text()), second, save, int((folder / "paused").read_text())


@pytest.mark.one_version  # the plugin's own checks
def test_second_run_on_a_save_directory_refuses_and_the_first_finishes_intact(two_runs):
    first, second, save, pid = two_runs
    assert second.returncode != 0, second.output[-3000:]
    owner = f"is in use by another run (host {socket.gethostname()}, process id {pid}"
    assert second.output.count(owner) == 1, second.output[-3000:]
    assert "Give this run another --save directory" in second.output and "swiftmoe.lock" in second.output
    assert iterations_logged(second) == []  # refused at start
    assert first.returncode == 0, first.output[-5000:]
    assert iterations_logged(first) == [1, 2, 3]
    assert (save / TRACKER).read_text().strip() == "3"
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", "iter_0000003", TRACKER]  # the lock is gone
    for iteration in (2, 3):
        assert len(list((save / f"iter_{iteration:07d}" / "swiftmoe").glob("*.pt"))) == 2


# ---------------------------------------------------------------- damaged checkpoints


def test_torch_checkpoint_resumed_with_other_slots_names_both_layouts(tree, two_runs):
    save = two_runs[2]
    run = launch(tree, 2, *tiny_moe(), "--swiftmoe", "--swiftmoe-slots-per-rank", "4", "--ckpt-format", "torch",
                 "--load", str(save))
    assert run.returncode != 0
    message = (f"the --ckpt-format torch checkpoint {save / 'iter_0000003'} was written with 2 tensor x context x "
               "data-parallel ranks x --swiftmoe-slots-per-rank 3; this run has 2 x 4")
    assert run.output.count(message) == 1, run.output[-3000:]
    assert "run on 2 tensor x context x data-parallel ranks with --swiftmoe-slots-per-rank 3" in run.output
    assert "save from such a run with --ckpt-format torch_dist" in run.output
    assert "size mismatch" not in run.output and "[rank0]: Traceback" not in run.output


def test_damaged_megatron_file_exits_non_zero(tree, two_runs, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(two_runs[2], copy)
    damaged = copy / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"
    os.truncate(damaged, damaged.stat().st_size // 2)
    run = launch(tree, 2, *tiny_moe(), *SWIFTMOE, "--ckpt-format", "torch", "--load", str(copy))
    assert run.returncode != 0, run.output[-3000:]  # Megatron alone exits 0 here
    assert "could not load the checkpoint" in run.output  # Megatron's own message
    assert f"Megatron-LM could not load the checkpoint of iteration 3 ({copy / 'iter_0000003'})" in run.output
    assert iterations_logged(run) == []


# ---------------------------------------------------------------- a NaN in one expert gradient


@pytest.fixture(scope="module")
def nan_run(tree, tmp_path_factory):
    """Rank 1 writes a NaN into an expert-slot gradient in iteration 4 (torch_dist, saves every 2)."""
    folder = tmp_path_factory.mktemp("nan")
    flags = [*tiny_moe(), *SWIFTMOE, "--ckpt-format", "torch_dist", "--save", str(folder / "ckpt"),
             "--save-interval", "2"]
    return with_fault(tree, "nan:1:4", folder, *flags), folder / "ckpt"


def test_nan_in_one_expert_gradient_stops_before_the_step(nan_run, tmp_path):
    """Megatron's rerun state machine (its default mode) re-runs iteration 4, finds the NaN again,
    saves the state before iteration 4 and exits with 16: nothing non-finite is stepped or saved."""
    run, save = nan_run
    assert run.returncode != 0 and "exitcode  : 16" in run.output, run.output[-5000:]
    # Megatron's own "iteration #" is one too high in core_v0.19.0: the message has ours.
    assert re.search(r"Unexpected result nan on rank 1 at iteration #\d+ invocation #1 \(message='found NaN or Inf in "
                     r"the local expert slot gradients, before their reduction, of SwiftMoE layer 0 "
                     r"\(transformer layer 1\) in iteration 4'\)", run.output), run.output[-5000:]
    assert "unexpected result is reproducible" in run.output
    assert iterations_logged(run) == [1, 2, 3]
    assert (save / TRACKER).read_text().strip() == "3"  # the exit-time save: the state before iteration 4
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(save / "iter_0000003", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert any("experts.experts.linear_fc1.weight" in key for key in tensors)
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values())


def test_truncated_distcp_file_is_named_with_its_iteration(tree, nan_run, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(nan_run[1], copy)
    damaged = copy / "iter_0000003" / "__1_0.distcp"
    size = damaged.stat().st_size
    os.truncate(damaged, size // 2)
    run = launch(tree, 2, *tiny_moe(), *SWIFTMOE, "--ckpt-format", "torch_dist", "--load", str(copy))
    assert run.returncode != 0, run.output[-3000:]
    message = (f"--load {copy}: the torch_dist checkpoint of iteration 3 is damaged: {damaged} is truncated: "
               f"{size // 2} bytes, the .metadata records data up to byte {size}")
    assert run.output.count(message) == 1, run.output[-3000:]
    assert "(older here: 2)" in run.output
    assert "CheckpointException" not in run.output and iterations_logged(run) == []


# ---------------------------------------------------------------- a full disk (and a skipped NaN step)


def test_out_of_space_while_saving_names_the_file_and_keeps_the_previous_checkpoint(tree, tmp_path):
    """Two faults in one run: with --no-check-for-nan-in-loss-and-grad a NaN in iteration 1 skips
    that step (nothing stepped); then the save of iteration 2 finds a full disk on rank 0."""
    save = tmp_path / "ckpt"
    flags = [*tiny_moe(**{"train-iters": 2}), *SWIFTMOE, "--ckpt-format", "torch", "--save", str(save),
             "--save-interval", "1", "--no-check-for-nan-in-loss-and-grad"]
    run = with_fault(tree, "nan:1:1,enospc:0:2", tmp_path, *flags)
    assert run.returncode != 0
    assert re.search(r"> SwiftMoE: grad norm nan: NaN or Inf in the expert gradients of rank 1: transformer layer 1, "
                     r"slot 0 \(expert \d+\): NaN; step skipped \(--no-check-for-nan-in-loss-and-grad\)", run.output)
    assert re.search(r"iteration\s+1/\s+2 \|.*number of skipped iterations:\s+1 \|", run.output), run.output[-5000:]
    named = (f"error: rank 0: saving the checkpoint of iteration 2 to {save}: cannot write "
             f"{save / 'iter_0000002' / 'mp_rank_00' / 'model_optim_rng.pt'}: No space left on device (ENOSPC)")
    assert run.output.count(named) == 1, run.output[-5000:]
    assert "[rank1]: Traceback" not in run.output and "unexpected pos" not in run.output
    assert (save / TRACKER).read_text().strip() == "1"
    previous = save / "iter_0000001"
    torch.load(previous / "mp_rank_00" / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    from megatron_swiftmoe.training.checkpointing import sha256_file

    for rank_state in (previous / "swiftmoe").glob("*.pt"):
        assert sha256_file(rank_state) == rank_state.with_name(rank_state.name + ".sha256").read_text().strip()
        state = torch.load(rank_state, weights_only=True)
        assert all(bool(torch.isfinite(t).all()) for t in state["expert_shards"])  # the skipped step stepped nothing


# ---------------------------------------------------------------- code-running pickles

REFUSALS = """
import json, sys, torch
from pathlib import Path
from megatron_swiftmoe.megatron_lm import checkpointing
from megatron_swiftmoe.training.checkpointing import sha256_file

class RunsCode:  # a pickle whose loading runs code (here: it creates a file)
    def __reduce__(self):
        return exec, (f"open({str(folder / 'marker')!r}, 'w').write('ran')",)

folder, messages = Path(sys.argv[1]), []
rank_file = checkpointing.rank_file(folder / "iter_0000003", 0, 0)
rank_file.parent.mkdir(parents=True)
torch.save({"layout": {}, "payload": RunsCode()}, rank_file)
rank_file.with_name(rank_file.name + ".sha256").write_text(sha256_file(rank_file))
args = type("Args", (), {"data_parallel_size": 1, "swiftmoe_slots_per_rank": 2})
try:
    checkpointing.read_rank_state(folder / "iter_0000003", 0, 0, args)
except checkpointing.SwiftMoECheckpointError as error:
    messages.append(str(error))
with checkpointing.unpickling_refusals_explained():
    try:
        torch.load(rank_file)  # as Megatron's own load calls it
    except Exception as error:
        messages.append(str(error))
print(json.dumps(messages))
"""


@pytest.mark.one_version  # the plugin's own checks
def test_code_running_pickles_are_refused_saying_why(tree, tmp_path):
    """SwiftMoE's per-rank file, and what Megatron prints when SwiftMoE loads: why the file was
    refused, without PyTorch's advice to load it with weights_only=False (which runs it)."""
    import json

    done = subprocess.run([sys.executable, "-c", REFUSALS, str(tmp_path)], cwd=tree, env=environment(tree),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    messages = json.loads(done.stdout.splitlines()[-1])
    assert len(messages) == 2, messages
    for message in messages:
        assert f"refusing to load {tmp_path / 'iter_0000003' / 'swiftmoe' / 'pp000_dp00000.pt'}" in message
        assert "(WeightsUnpickler error: Unsupported global: GLOBAL exec was not an allowed global by default.)" in message
        assert "could run code when loaded" in message and "weights_only" not in message
    assert not (tmp_path / "marker").exists()
