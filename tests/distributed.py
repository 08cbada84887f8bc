"""Run a test function on several gloo processes on this machine."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=TIMEOUT_S)
    )
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, tmp_path) -> object:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return rank 0's result.

    ``fn`` must be importable (module level). A process that fails fails the test with its
    traceback; a hang ends after TIMEOUT_S seconds instead of blocking the suite.
    """
    result_path = str(tmp_path / f"result_{fn.__name__}_{world_size}.pt")
    context = mp.start_processes(
        _entry,
        args=(world_size, _free_port(), fn, args, result_path),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S + 30)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in time")
    return torch.load(result_path, weights_only=False)
