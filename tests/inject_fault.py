"""The training program with a fault injected on one rank, from the tests' side (no hook in the product).

    torchrun --nproc-per-node N tests/inject_fault.py RANK ITERATION KIND -- PRETRAIN_FLAGS...

Rank ``RANK``, in training step ``ITERATION + 1`` (after ``ITERATION`` steps), does ``KIND``:

* ``raise``: raises a RuntimeError when the step starts;
* ``hang``: stops answering when the step starts;
* ``nan``: writes a NaN into one gradient of expert slot 0 of its first SwiftMoE layer, after
  the backward pass and before the optimizer step;
* ``pause``: when the step starts, writes its process id to ``$INJECT_FAULT_DIR/paused`` and
  waits until ``$INJECT_FAULT_DIR/resume`` exists (the other ranks wait in their next collective);
* ``enospc``: the checkpoint save of iteration ``ITERATION`` fails on that rank as on a full
  disk: writing its file raises ``OSError(ENOSPC)`` after the first KiB.

The other ranks run the program unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import time
from pathlib import Path

from megatron_swiftmoe.training import checkpointing, pretrain_gpt


class FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes."""

    room = 1024

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def main(argv: list[str]) -> None:
    fault_rank, at_iteration, kind, separator, *flags = argv
    assert separator == "--" and kind in ("raise", "hang", "nan", "pause", "enospc"), argv
    here = int(os.environ["RANK"]) == int(fault_rank)
    train_step, step_optimizer = pretrain_gpt.Trainer.train_step, pretrain_gpt.Trainer.step_optimizer

    def faulty_train_step(self):
        if here and self.iteration == int(at_iteration):
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {fault_rank} at iteration {at_iteration}")
            if kind == "hang":
                print(f"rank {fault_rank} stops answering at iteration {at_iteration}", file=sys.stderr, flush=True)
                time.sleep(3600)
            if kind == "pause":
                folder = Path(os.environ["INJECT_FAULT_DIR"])
                (folder / "paused").write_text(str(os.getpid()))
                while not (folder / "resume").exists():
                    time.sleep(0.2)
        return train_step(self)

    def poisoned_step_optimizer(self):
        if here and self.iteration == int(at_iteration):
            from megatron_swiftmoe.core.optimizer import param_grad

            param_grad(self.optimizer.layers[0].experts.fc1)[0].view(-1)[0] = float("nan")
        return step_optimizer(self)

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode and f"iter_{int(at_iteration):07d}" in str(path) and Path(path).suffix == ".pt":
            return FullDisk(path, "wb")
        return open(path, mode, *args, **kwargs)

    pretrain_gpt.Trainer.train_step = faulty_train_step
    if here and kind == "nan":
        pretrain_gpt.Trainer.step_optimizer = poisoned_step_optimizer
    if here and kind == "enospc":
        checkpointing.open = full_disk_open  # the name the checkpoint writer opens its files with
    pretrain_gpt.main(flags)


if __name__ == "__main__":
    main(sys.argv[1:])
