"""Checkpoints: every rank's whole training state, written atomically, checked on load.

Layout (Megatron-LM's naming)::

    SAVE/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    SAVE/iter_0000100/metadata.json             model shape, world size, strategy, iteration
    SAVE/iter_0000100/rank_00000.pt             that rank's model, optimizer shards, RNG, ...

Each rank holds different state (its optimizer shards, its slots or experts), so each rank
saves its own file. A save goes to ``iter_XXXXXXX.tmp`` first; only when every rank has
written and synced its file does rank 0 rename the directory and then replace the tracker
file, both atomic renames. A run killed mid-save leaves the previous checkpoint untouched
and the tracker pointing at it; the stale ``.tmp`` directory is removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
# Settings that must match for a checkpoint to be loadable (flag name -> args attribute).
MUST_MATCH = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_layer_freq",
    "swiglu",
    "normalization",
    "position_embedding_type",
    "untie_embeddings_and_output_weights",
    "padded_vocab_size",
    "world_size",
    "swiftmoe",
    "swiftmoe_slots_per_rank",
    "bf16",
    "fp16",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, with the reason and what to do."""


def _iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _metadata(args, iteration: int) -> dict[str, Any]:
    return {"iteration": iteration, **{name: getattr(args, name, None) for name in MUST_MATCH}}


def save_checkpoint(root: str | Path, iteration: int, args, state: dict[str, Any]) -> Path:
    """Collective: every rank saves ``state`` (its own) for ``iteration`` under ``root``."""
    root = Path(root)
    rank = dist.get_rank()
    final = _iteration_dir(root, iteration)
    staging = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
        (staging / "metadata.json").write_text(json.dumps(_metadata(args, iteration), indent=1))
    dist.barrier()
    rank_file = staging / f"rank_{rank:05d}.pt"
    torch.save(state, rank_file)
    _fsync_file(rank_file)
    dist.barrier()
    if rank == 0:
        if final.exists():  # re-saving an iteration (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        staging.rename(final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        _fsync_file(tracker_tmp)
        os.replace(tracker_tmp, root / TRACKER)
    dist.barrier()
    return final


def latest_iteration(root: str | Path) -> int | None:
    """Iteration of the newest complete checkpoint under ``root``, or None if there is none."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt (content {text!r}, expected an iteration number)")
    return int(text)


def load_checkpoint(root: str | Path, args) -> tuple[int, dict[str, Any]] | None:
    """This rank's state of the newest checkpoint under ``root`` and its iteration, or None.

    Raises :class:`CheckpointError` naming the problem when the checkpoint is incomplete,
    unreadable, or was written by a different model shape / world size / strategy.
    """
    root = Path(root)
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    directory = _iteration_dir(root, iteration)
    metadata_path = directory / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {metadata_path}: {error}; the checkpoint is incomplete or corrupt") from error
    expected = _metadata(args, iteration)
    mismatches = [
        f"{name}: checkpoint {metadata.get(name)!r} vs now {expected[name]!r}"
        for name in MUST_MATCH
        if json.loads(json.dumps(expected[name])) != metadata.get(name)
    ]
    if mismatches:
        raise CheckpointError(
            f"checkpoint {directory} was written with different settings:\n  "
            + "\n  ".join(mismatches)
            + "\nresume with the same model shape, number of ranks and --swiftmoe settings "
            "(or start a new run with another --save directory)"
        )
    rank_file = directory / f"rank_{dist.get_rank():05d}.pt"
    try:
        state = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"cannot load {rank_file}: {error}; the checkpoint file is missing or corrupt") from error
    return iteration, state
