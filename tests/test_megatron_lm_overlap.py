"""SwiftMoE's overlapped expert traffic inside Megatron-LM's ``pretrain_gpt.py``
(``--overlap-grad-reduce --overlap-param-gather`` with ``--use-distributed-optimizer``).

One configuration carries every edge at once: 2 pipeline stages x 2 data-parallel ranks,
3 micro-batches per step, per-token losses (the shard gradients are scaled after their
reduction), evaluation every 2 iterations and a checkpoint at iteration 2, both while
re-placements are in flight. It trains like the run without overlap and like Megatron's
static expert parallelism, and a run resumed from its mid-run checkpoint continues it (and
stops at ``--exit-interval`` with a re-placement in flight).
CPU ranks on gloo (see tests/megatron_lm.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.megatron_lm import Run, assert_ok, launch, tiny_moe

RTOL = 1e-5
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
NOTICE = "expert traffic: overlapped (gradient reduction with backward, re-placement with the next forward)"


@pytest.fixture(scope="module")
def initial_checkpoint(tree, tmp_path_factory) -> Path:
    """One static iteration saved in torch_dist: every compared run starts from its weights."""
    path = tmp_path_factory.mktemp("init")
    assert_ok(launch(tree, 2, *tiny_moe(num_experts=6, **{"train-iters": 1}), "--ckpt-format", "torch_dist",
                     "--save", str(path), "--save-interval", "1"))
    return path


def validation_losses(run: Run) -> dict[int, float]:
    found = re.findall(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)", run.output)
    return {int(i): float(v) for i, v in found}


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys() and got, (got, want)
    for iteration in got:
        assert math.isclose(got[iteration], want[iteration], rel_tol=RTOL), (iteration, got, want)


def test_overlapped_swiftmoe_equals_synchronous_and_static_with_eval_and_resume(tree, initial_checkpoint, tmp_path):
    flags = [*tiny_moe(num_experts=6, **{"train-iters": 4, "eval-interval": 2, "eval-iters": 1}),
             "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--calculate-per-token-loss",
             "--ckpt-format", "torch_dist"]
    start = ["--load", str(initial_checkpoint), "--finetune"]
    swiftmoe = ["--swiftmoe", "--swiftmoe-slots-per-rank", "4"]
    checkpoint = tmp_path / "ckpt"
    on = assert_ok(launch(tree, 4, *flags, *start, *swiftmoe, *OVERLAP, "--save", str(checkpoint),
                          "--save-interval", "2"), "overlapped")
    off = assert_ok(launch(tree, 4, *flags, *start, *swiftmoe), "not overlapped")
    static = assert_ok(launch(tree, 4, *flags, *start, *OVERLAP), "static EP 1")
    # Resume from the checkpoint saved at iteration 2 (the run saved iteration 4 too), and stop
    # at 3 (--exit-interval) with that step's re-placement in flight.
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = assert_ok(launch(tree, 4, *flags, *swiftmoe, *OVERLAP, "--load", str(checkpoint), "--exit-interval", "3"),
                        "resumed")

    assert NOTICE in on.output and NOTICE not in off.output
    assert sorted(on.losses) == [1, 2, 3, 4] and sorted(validation_losses(on)) == [2, 4]
    for other in (off, static):
        assert_close(on.losses, other.losses)
        assert_close(validation_losses(on), validation_losses(other))
    assert resumed.losses == {3: on.losses[3]}
