"""Checkpoint writes are atomic and bad checkpoints fail with a clear reason."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from megatron_swiftmoe.training.checkpointing import (
    MUST_MATCH,
    TRACKER,
    CheckpointError,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from tests.distributed import run_distributed


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
    save_checkpoint(root, 10, _args(), {"weights": torch.arange(1000.0)})
    try:
        save_checkpoint(root, 20, _args(), {"weights": torch.zeros(100_000), "boom": FailsHalfwayThroughPickling()})
    except RuntimeError:
        pass
    iteration, state = load_checkpoint(root, _args())
    leftovers = sorted(p.name for p in Path(root).iterdir())
    save_checkpoint(root, 30, _args(), {"weights": torch.ones(3)})  # the next good save cleans up
    return dict(iteration=iteration, weights=state["weights"], leftovers=leftovers,
                after=sorted(p.name for p in Path(root).iterdir()), latest=latest_iteration(root))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    r = run_distributed(interrupted_save_worker, 1, str(root), tmp_path=tmp_path)
    assert r["iteration"] == 10
    assert torch.equal(r["weights"], torch.arange(1000.0))
    assert "iter_0000020.tmp" in r["leftovers"] and "iter_0000020" not in r["leftovers"]
    assert r["latest"] == 30
    assert r["after"] == ["iter_0000010", "iter_0000030", TRACKER]


def bad_checkpoint_worker(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    messages = {}
    save_checkpoint(root, 5, _args(), {"weights": torch.ones(2)})

    def attempt(name, args=None):
        try:
            load_checkpoint(root, args or _args())
            messages[name] = None
        except CheckpointError as error:
            messages[name] = str(error)

    attempt("other_shape", _args(hidden_size=2, world_size=2))
    rank_file = root / "iter_0000005" / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:40])
    attempt("truncated")
    (root / TRACKER).write_text("five")
    attempt("bad_tracker")
    messages["empty_dir"] = load_checkpoint(root / "nothing", _args())
    return messages


def test_bad_checkpoints_fail_clearly(tmp_path):
    m = run_distributed(bad_checkpoint_worker, 1, str(tmp_path / "ckpt"), tmp_path=tmp_path)
    assert "hidden_size: checkpoint 1 vs now 2" in m["other_shape"]
    assert "world_size: checkpoint 1 vs now 2" in m["other_shape"]
    assert "rank_00000.pt" in m["truncated"] and "corrupt" in m["truncated"]
    assert "corrupt" in m["bad_tracker"]
    assert m["empty_dir"] is None
