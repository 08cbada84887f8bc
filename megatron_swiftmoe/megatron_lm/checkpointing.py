"""SwiftMoE state in Megatron-LM checkpoints.

* ``--ckpt-format torch_dist``: everything goes through ``megatron.core.dist_checkpointing``.
  The layers' ``sharded_state_dict`` writes the expert weights in the format of Megatron's
  static experts and the expert optimizer its Adam moments keyed the same way, so a checkpoint
  saved on N ranks loads on M ranks or with another ``--swiftmoe-slots-per-rank``, and a static
  run's checkpoint starts a SwiftMoE run (and back; the optimizer state does not convert, so
  such a load takes ``--no-load-optim`` or ``--finetune``). The checkpoint's content metadata
  says that it was written with SwiftMoE (``metadata["swiftmoe"]``).
* ``--ckpt-format torch``: Megatron writes the model and optimizer state of data-parallel rank
  0 only, but every rank's expert shards and Adam moments differ. Each rank therefore also
  writes ``iter_XXXXXXX/swiftmoe/pp{PP}_dp{DP}.pt`` with a ``.sha256`` beside it, before
  Megatron replaces the tracker file; loading verifies it and reads it back. Such a checkpoint
  loads only with the same number of data-parallel ranks and slots (a clear error otherwise).

In both formats the slots are refilled from the shards after a load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_swiftmoe.megatron_lm.arguments import replica_group_size
from megatron_swiftmoe.training.agreement import ExplainedError, agree
from megatron_swiftmoe.training.checkpointing import fsync_file, sha256_file


class SwiftMoECheckpointError(ExplainedError):
    """A SwiftMoE checkpoint that cannot be loaded, with the reason and the fix."""


def layout(args) -> dict:
    """What a checkpoint records about the SwiftMoE layout it was written with: the ranks of a
    stage's replica group (tensor x context x data-parallel) and the slots per rank."""
    return {"num_ranks": replica_group_size(args), "slots_per_rank": args.swiftmoe_slots_per_rank}


def rank_file(iteration_dir: str | Path, pp_rank: int, dp_rank: int) -> Path:
    """``dp_rank`` is the position in the replica group: the data-parallel rank when tensor and
    context parallelism are off (the name files have always had)."""
    return Path(iteration_dir) / "swiftmoe" / f"pp{pp_rank:03d}_dp{dp_rank:05d}.pt"


def save_rank_state(iteration_dir: str | Path, pp_rank: int, dp_rank: int, args, layers: list, optimizer) -> None:
    """Write this rank's expert shards and Adam moments (atomically, with a checksum)."""
    path = rank_file(iteration_dir, pp_rank, dp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "layout": layout(args),
        "expert_shards": [layer.expert_shard.detach().cpu() for layer in layers],
        "moments": [{k: v.detach().cpu() for k, v in m.items()} for m in optimizer.moments()],
    }
    staging = path.with_name(path.name + ".tmp")
    torch.save(state, staging)
    fsync_file(staging)
    os.replace(staging, path)
    path.with_name(path.name + ".sha256").write_text(sha256_file(path) + "\n")


def read_rank_state(iteration_dir: str | Path, pp_rank: int, dp_rank: int, args) -> dict:
    """This rank's SwiftMoE state, verified; raises :class:`SwiftMoECheckpointError` naming the file."""
    path = rank_file(iteration_dir, pp_rank, dp_rank)
    where = f"{path} (pipeline rank {pp_rank}, data-parallel rank {dp_rank})"
    if not path.parent.is_dir():
        raise SwiftMoECheckpointError(
            f"{iteration_dir} has no SwiftMoE state: it was written without --swiftmoe. A static run's "
            "checkpoint starts a SwiftMoE run in --ckpt-format torch_dist (with --no-load-optim or --finetune)"
        )
    checksum = path.with_name(path.name + ".sha256")
    if not path.is_file() or not checksum.is_file():
        raise SwiftMoECheckpointError(f"{where} is missing: the checkpoint is incomplete")
    if sha256_file(path) != checksum.read_text().strip():
        raise SwiftMoECheckpointError(f"{where} does not match its checksum {checksum.name}: the file is damaged")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable file, whatever the reason
        raise SwiftMoECheckpointError(f"cannot read {where}: {error}") from error
    if state["layout"] != layout(args):
        raise SwiftMoECheckpointError(
            f"{where} was written with {state['layout']}, this run has {layout(args)}: a --ckpt-format torch "
            "checkpoint needs the same tensor x context x data-parallel size and --swiftmoe-slots-per-rank; save in "
            "torch_dist to reshard"
        )
    return state


@torch.no_grad()
def load_rank_state(iteration_dir, pp_rank: int, dp_rank: int, args, layers: list, optimizer, load_optim: bool) -> None:
    """Read back :func:`save_rank_state` on every rank (all ranks agree first: collective)."""
    state = agree("loading SwiftMoE's per-rank checkpoint state",
                  lambda: read_rank_state(iteration_dir, pp_rank, dp_rank, args))
    for layer, shard in zip(layers, state["expert_shards"]):
        layer.expert_shard.copy_(shard)
    if load_optim:
        optimizer.load_moments(state["moments"])

