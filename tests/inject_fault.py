"""The training program with a fault injected on one rank, from the tests' side (no hook in the product).

    torchrun --nproc-per-node N tests/inject_fault.py RANK ITERATION raise|hang -- PRETRAIN_FLAGS...

Rank ``RANK`` raises a RuntimeError (``raise``) or stops answering (``hang``) when it starts
training step ``ITERATION + 1``; the other ranks run the program unchanged.
"""

from __future__ import annotations

import os
import sys
import time

from megatron_swiftmoe.training import pretrain_gpt


def main(argv: list[str]) -> None:
    fault_rank, at_iteration, kind, separator, *flags = argv
    assert separator == "--" and kind in ("raise", "hang"), argv
    train_step = pretrain_gpt.Trainer.train_step

    def faulty_train_step(self):
        if int(os.environ["RANK"]) == int(fault_rank) and self.iteration == int(at_iteration):
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {fault_rank} at iteration {at_iteration}")
            print(f"rank {fault_rank} stops answering at iteration {at_iteration}", file=sys.stderr, flush=True)
            time.sleep(3600)
        return train_step(self)

    pretrain_gpt.Trainer.train_step = faulty_train_step
    pretrain_gpt.main(flags)


if __name__ == "__main__":
    main(sys.argv[1:])
