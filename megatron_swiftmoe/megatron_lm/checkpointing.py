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

Before Megatron loads anything, :func:`check_before_load` (rank 0, agreed by every rank) checks
what can be checked cheaply: a torch-format checkpoint's SwiftMoE layout against this run's
(Megatron would otherwise stop every rank with a ``size mismatch`` traceback for the layers'
``placement``), and a torch_dist checkpoint's files against the sizes its ``.metadata`` records
(a missing or truncated ``.distcp`` file would otherwise surface as a ``CheckpointException``
that names no file). torch_dist files carry no checksums: other damage is not found here.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Optional

import torch

from megatron_swiftmoe.megatron_lm.arguments import replica_group_size
from megatron_swiftmoe.training.agreement import ExplainedError, agree
from megatron_swiftmoe.training.checkpointing import (
    refusal_reason, sha256_file, write_torch_file, writing,
)


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
    write_torch_file(state, staging)
    with writing(path):
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
    except pickle.UnpicklingError as error:
        raise SwiftMoECheckpointError(f"refusing to load {where}: {refusal_reason(error)}") from None
    except Exception as error:  # noqa: BLE001 - an unreadable file, whatever the reason
        raise SwiftMoECheckpointError(f"cannot read {where}: {error}") from error
    if state["layout"] != layout(args):
        raise SwiftMoECheckpointError(_other_layout(iteration_dir, state["layout"], args))
    return state


def _other_layout(iteration_dir, saved: dict, args) -> str:
    now = layout(args)
    return (
        f"the --ckpt-format torch checkpoint {iteration_dir} was written with {saved['num_ranks']} tensor x context x "
        f"data-parallel ranks x --swiftmoe-slots-per-rank {saved['slots_per_rank']}; this run has {now['num_ranks']} x "
        f"{now['slots_per_rank']}. A torch-format checkpoint holds each rank's expert shards, so it resumes only "
        f"with the layout it was written with: run on {saved['num_ranks']} tensor x context x data-parallel ranks with "
        f"--swiftmoe-slots-per-rank {saved['slots_per_rank']}. To change the layout, save from such a run with "
        "--ckpt-format torch_dist, which reshards to any number of ranks and slots"
    )


def iteration_to_load(load_dir: Optional[str]) -> Optional[tuple[int, Path]]:
    """The iteration Megatron will load from ``load_dir`` and its directory (None: nothing)."""
    from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename

    tracker = Path(get_checkpoint_tracker_filename(load_dir)) if load_dir else None
    if tracker is None or not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return 0, Path(load_dir) / "release"
    if not text.isdigit():
        raise SwiftMoECheckpointError(f"{tracker} is corrupt (content {text!r}, expected an iteration number)"
                                      + _older(load_dir, None))
    return int(text), Path(get_checkpoint_name(load_dir, int(text), return_base_dir=True))


def _older(load_dir, iteration: Optional[int]) -> str:
    """How to resume from an older checkpoint of ``load_dir`` instead."""
    older = sorted((int(p.name[5:]) for p in Path(load_dir).glob("iter_*") if p.name[5:].isdigit()
                    and (iteration is None or int(p.name[5:]) < iteration)), reverse=True)
    if not older:
        return f"; {load_dir} holds no older checkpoint to resume from instead"
    return (f"; to resume from an older checkpoint instead, write its iteration into "
            f"{Path(load_dir) / 'latest_checkpointed_iteration.txt'} (older here: {', '.join(map(str, older[:5]))})")


def check_before_load(load_dir: Optional[str], args) -> None:
    """What can be checked before Megatron loads anything (rank 0; local: no collective).

    torch format: the SwiftMoE layout the checkpoint was written with; torch_dist: every file
    the ``.metadata`` refers to, present and as long as it records. Raises
    :class:`SwiftMoECheckpointError`.
    """
    if getattr(args, "non_persistent_ckpt_type", None):
        return  # Megatron may load a newer non-persistent checkpoint instead of the tracker's
    found = iteration_to_load(load_dir)
    if found is None:
        return
    iteration, directory = found
    if not directory.is_dir():
        raise SwiftMoECheckpointError(f"--load {load_dir}: the checkpoint of iteration {iteration} ({directory}) "
                                      "is missing" + _older(load_dir, iteration))
    if (directory / ".metadata").exists():
        problem = _distcp_problem(directory)
        if problem:
            raise SwiftMoECheckpointError(f"--load {load_dir}: the torch_dist checkpoint of iteration {iteration} is "
                                          f"damaged: {problem}" + _older(load_dir, iteration))
        return
    first = rank_file(directory, 0, 0)
    if not first.parent.is_dir():
        raise SwiftMoECheckpointError(
            f"{directory} has no SwiftMoE state: it was written without --swiftmoe. A static run's "
            "checkpoint starts a SwiftMoE run in --ckpt-format torch_dist (with --no-load-optim or --finetune)"
        )
    try:  # memory-mapped: only the small record is read, not the tensors
        saved = torch.load(first, map_location="cpu", weights_only=True, mmap=True)["layout"]
    except Exception:  # noqa: BLE001 - a damaged file is named with its checksum by load_rank_state
        return
    if saved != layout(args):
        raise SwiftMoECheckpointError(f"--load {load_dir}: {_other_layout(directory, saved, args)}")


def _distcp_problem(directory: Path) -> Optional[str]:
    """What is wrong with the files of a torch_dist checkpoint, by the ``.metadata``'s record."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # noqa: BLE001 - unreadable, whatever the reason
        return f"cannot read {directory / '.metadata'}: {type(error).__name__}: {error}"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size < end:
            problems.append(f"{path} is truncated: {path.stat().st_size} bytes, the .metadata records data up "
                            f"to byte {end}")
    # Megatron-Core before 0.19 keeps the common state in common.pt; later ones inside the .distcp files
    common_inside = any(key.startswith("common_state") for key in metadata.state_dict_metadata)
    expected = ("metadata.json",) if common_inside else ("common.pt", "metadata.json")
    problems += [f"{directory / name} is missing" for name in expected if not (directory / name).is_file()]
    return "; ".join(problems) or None


@contextlib.contextmanager
def unpickling_refusals_explained():
    """While Megatron loads: a file refused by weights-only unpickling raises an error that says
    why, instead of PyTorch's advice to load it with ``weights_only=False`` (which would run it)."""
    load = torch.load

    def explained_load(f, *args, **kwargs):
        try:
            return load(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"refusing to load {f}: {refusal_reason(error)}") from None

    torch.load = explained_load
    try:
        yield
    finally:
        torch.load = load


@contextlib.contextmanager
def write_errors_named():
    """While Megatron saves: ``torch.save(obj, path)`` writes through a Python file, so that an OS
    error (a full disk) raises :class:`~megatron_swiftmoe.training.checkpointing.CheckpointWriteError`
    naming the path and the cause, not torch's ``unexpected pos`` or ``basic_ios::clear``."""
    save = torch.save

    def named_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and not args and not kwargs:
            return write_torch_file(obj, f, sync=False)
        return save(obj, f, *args, **kwargs)

    torch.save = named_save
    try:
        yield
    finally:
        torch.save = save


@torch.no_grad()
def load_rank_state(iteration_dir, pp_rank: int, dp_rank: int, args, layers: list, optimizer, load_optim: bool) -> None:
    """Read back :func:`save_rank_state` on every rank (all ranks agree first: collective)."""
    state = agree("loading SwiftMoE's per-rank checkpoint state",
                  lambda: read_rank_state(iteration_dir, pp_rank, dp_rank, args))
    for layer, shard in zip(layers, state["expert_shards"]):
        layer.expert_shard.copy_(shard)
    if load_optim:
        optimizer.load_moments(state["moments"])

