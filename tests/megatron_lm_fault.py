"""A patched Megatron-LM checkout's ``pretrain_gpt.py`` with a fault injected on one rank (tests only).

    torchrun --nproc-per-node N /path/to/tests/megatron_lm_fault.py PRETRAIN_FLAGS...

run in the checkout, with ``SWIFTMOE_TEST_FAULT=KIND:RANK:ITERATION[,KIND:RANK:ITERATION...]`` in
the environment. Rank ``RANK``, in training iteration ``ITERATION`` (Megatron's numbering, from 1),
does ``KIND``:

* ``nan``: writes a NaN into one gradient of expert slot 0 of its first SwiftMoE layer, after
  the backward pass (before Megatron finalises the gradients), in every run of the iteration
  (Megatron's re-run included);
* ``pause``: when the iteration starts, writes its process id to ``$SWIFTMOE_TEST_FAULT_DIR/paused``
  and waits until ``$SWIFTMOE_TEST_FAULT_DIR/resume`` exists;
* ``enospc``: the checkpoint save of iteration ``ITERATION`` fails on that rank as on a full
  disk: writing Megatron's ``model_optim_rng.pt`` raises ``OSError(ENOSPC)`` after the first KiB.

Everything else is the checkout's own ``pretrain_gpt.py``, unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

sys.path[0] = os.getcwd()  # as when the checkout's pretrain_gpt.py runs: the checkout, not tests/

import megatron_swiftmoe.megatron_lm  # noqa: F401 - binds the plugin's wrappers first, to wrap them here
from megatron.training import get_args, training

from megatron_swiftmoe.core.layer import swiftmoe_layers
from megatron_swiftmoe.core.optimizer import param_grad
from megatron_swiftmoe.training import checkpointing
from tests.inject_fault import FullDisk


def _now(rank: int, iteration: int) -> bool:
    return int(os.environ["RANK"]) == rank and get_args().curr_iteration + 1 == iteration


def inject(kind: str, rank: int, iteration: int) -> None:
    if kind == "nan":
        finalize = training.finalize_model_grads

        def poisoned_finalize(model, *args, **kwargs):
            if _now(rank, iteration):
                param_grad(swiftmoe_layers(model)[0].experts.fc1)[0].view(-1)[0] = float("nan")
            return finalize(model, *args, **kwargs)

        training.finalize_model_grads = poisoned_finalize
    elif kind == "pause":
        train_step = training.train_step

        def paused_train_step(*args, **kwargs):
            if _now(rank, iteration):
                folder = Path(os.environ["SWIFTMOE_TEST_FAULT_DIR"])
                (folder / "paused").write_text(str(os.getpid()))
                while not (folder / "resume").exists():
                    time.sleep(0.2)
            return train_step(*args, **kwargs)

        training.train_step = paused_train_step
    elif kind == "enospc" and int(os.environ["RANK"]) == rank:

        def full_disk_open(path, mode="r", *args, **kwargs):
            if "w" in mode and f"iter_{iteration:07d}" in str(path) and Path(path).name == "model_optim_rng.pt":
                return FullDisk(path, "wb")
            return open(path, mode, *args, **kwargs)

        checkpointing.open = full_disk_open  # the name the checkpoint writer opens its files with
    else:
        assert kind == "enospc", kind


def main() -> None:
    for fault in os.environ["SWIFTMOE_TEST_FAULT"].split(","):
        kind, rank, iteration = fault.split(":")
        inject(kind, int(rank), int(iteration))
    sys.argv = ["pretrain_gpt.py", *sys.argv[1:]]
    runpy.run_path("pretrain_gpt.py", run_name="__main__")


if __name__ == "__main__":
    main()
