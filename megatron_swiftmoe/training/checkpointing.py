"""Checkpoints: every rank's whole training state, written atomically, verified before loading.

Layout (Megatron-LM's naming)::

    SAVE/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    SAVE/iter_0000100/metadata.json             model shape, world size, pipeline stages,
                                                strategy, iteration, size and SHA-256 of
                                                every rank's file
    SAVE/iter_0000100/rank_00000.pt             that rank's model, optimizer shards, RNG, ...

Each rank holds different state (its optimizer shards, its slots or experts), so each rank
saves its own file. A save goes to ``iter_XXXXXXX.tmp`` first; only when every rank has
written and synced its file does rank 0 write ``metadata.json`` with every file's checksum,
rename the directory and then replace the tracker file, both atomic renames. A run killed
mid-save leaves the previous checkpoint untouched and the tracker pointing at it; the stale
``.tmp`` directory is removed by the next save.

Loading is collective and agreed (:mod:`~megatron_swiftmoe.training.agreement`): every rank
checks its file's size and checksum against ``metadata.json`` and reads it with
``torch.load(weights_only=True)`` (tensors and plain containers only: a file that would run
code when unpickled is refused); if any rank fails, every rank raises the same error, which
names the file, its rank and iteration. ``fallback=True`` (``--load-fallback``) then tries the
next older complete iteration, the same one on every rank.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_swiftmoe.training.agreement import AgreedError, ExplainedError, agree

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
    "pipeline_model_parallel_size",
    "swiftmoe",
    "swiftmoe_slots_per_rank",
    "bf16",
    "fp16",
)
# What a setting was before this program recorded it (checkpoints of older versions).
_UNRECORDED = {"pipeline_model_parallel_size": 1}
_ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(ExplainedError):
    """A checkpoint that cannot be loaded, with the reason and what to do."""


def _iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointWriteError(ExplainedError):
    """A checkpoint file or directory that could not be written: its path and the cause."""


def os_cause(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself or one it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_failure(path: str | Path, error: BaseException) -> CheckpointWriteError:
    """``error`` raised while writing ``path``, as one message naming the path and the cause
    (the OS error behind it, where there is one: torch's own message for a full disk is
    ``unexpected pos ...`` or ``basic_ios::clear``)."""
    if isinstance(error, CheckpointWriteError):
        return error
    cause = os_cause(error)
    if cause is None:
        return CheckpointWriteError(f"cannot write {path}: {type(error).__name__}: {str(error).strip()}")
    name = errno.errorcode.get(cause.errno, str(cause.errno))
    reason = f"{cause.strerror or os.strerror(cause.errno)} ({name})"
    if cause.filename and str(cause.filename) != str(path):
        reason += f" on {cause.filename}"
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += f"; free space on that filesystem (df -h {Path(path).parent}) or save elsewhere"
    return CheckpointWriteError(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn any failure inside into :func:`write_failure` for ``path``."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as error:  # noqa: BLE001 - every failure gets the path and its cause
        raise write_failure(path, error) from error


def write_torch_file(obj: Any, path: str | Path, sync: bool = True) -> None:
    """``torch.save(obj, path)`` through a Python file (fsynced), so that an OS error keeps its
    cause; raises :class:`CheckpointWriteError` naming ``path``."""
    with writing(path), open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def _metadata(args, iteration: int) -> dict[str, Any]:
    return {"iteration": iteration, **{name: getattr(args, name, None) for name in MUST_MATCH}}


# --------------------------------------------------------------------------- save


def save_checkpoint(root: str | Path, iteration: int, args, state: dict[str, Any],
                    guard: Callable[[], None] | None = None) -> Path:
    """Collective: every rank saves ``state`` (its own) for ``iteration`` under ``root``.

    A failure on any rank (a full disk, an unpicklable object) raises the same
    :class:`~megatron_swiftmoe.training.agreement.AgreedError` on every rank, naming the file and
    the cause, and leaves the previous checkpoint and the tracker untouched. ``guard`` runs on
    rank 0 before anything is written (e.g. the save lock's check) and may raise to stop the save.
    """
    root = Path(root)
    rank = dist.get_rank()
    final = _iteration_dir(root, iteration)
    staging = final.with_name(final.name + ".tmp")

    def prepare() -> None:
        if rank == 0:
            if guard is not None:
                guard()
            with writing(staging):
                root.mkdir(parents=True, exist_ok=True)
                for stale in root.glob("iter_*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                staging.mkdir()

    def write() -> dict[str, Any]:
        rank_file = _rank_file(staging, rank)
        write_torch_file(state, rank_file)
        return {"bytes": rank_file.stat().st_size, "sha256": sha256_file(rank_file)}

    def commit() -> None:
        if rank != 0:
            return
        names = [_rank_file(staging, r).name for r in range(len(files))]
        metadata = {**_metadata(args, iteration), "files": dict(zip(names, files))}
        with writing(staging / "metadata.json"):
            (staging / "metadata.json").write_text(json.dumps(metadata, indent=1))
            fsync_file(staging / "metadata.json")
        replaced = final.with_name(final.name + ".old.tmp")
        with writing(final):
            if final.exists():  # re-saving an iteration (e.g. after a resume): replace it whole
                final.rename(replaced)  # removed once the new one is in place (or by the next save)
            try:
                staging.rename(final)
            except OSError:
                if replaced.exists():
                    replaced.rename(final)
                raise
        tracker_tmp = root / (TRACKER + ".tmp")
        with writing(tracker_tmp):
            tracker_tmp.write_text(str(iteration))
            fsync_file(tracker_tmp)
            os.replace(tracker_tmp, root / TRACKER)
        shutil.rmtree(replaced, ignore_errors=True)

    try:
        agree(f"saving checkpoint {final}: creating {staging}", prepare)
        files = agree(f"saving checkpoint {final}: writing the rank files", write, gather=True)
        agree(f"saving checkpoint {final}: committing it", commit)
    except AgreedError as error:
        raise AgreedError(f"{error}\nThe checkpoint of iteration {iteration} was not written; "
                          f"{root / TRACKER} still names the previous one") from None
    return final


# --------------------------------------------------------------------------- load


def latest_iteration(root: str | Path) -> int | None:
    """Iteration of the newest complete checkpoint under ``root``, or None if there is none."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt (content {text!r}, expected an iteration number)")
    return int(text)


def _complete_iterations(root: Path) -> list[int]:
    """Iterations of the renamed (hence complete) checkpoint directories under ``root``, newest first."""
    found = (int(m[1]) for p in root.iterdir() if p.is_dir() and (m := _ITERATION_DIR.match(p.name)))
    return sorted(found, reverse=True)


def _listing(root: Path, args, fallback: bool) -> tuple[list[int], list[int], str | None]:
    """The iterations to try (newest first), the older complete ones, and why the tracker
    cannot be used (None if it can)."""
    try:
        latest, problem = latest_iteration(root), None
    except CheckpointError as error:
        if not fallback:
            raise CheckpointError(f"{error}; --load-fallback loads the newest complete checkpoint instead") from None
        latest, problem = None, str(error)
    if latest is None and problem is None:
        return [], [], None  # nothing saved there yet
    if latest is not None:
        try:
            newest = json.loads((_iteration_dir(root, latest) / "metadata.json").read_text())
        except (OSError, ValueError):
            newest = None  # reported, with the file, when the ranks verify the checkpoint
        if isinstance(newest, dict):
            # Another run's checkpoints (other model, world size or strategy): falling back cannot help.
            _check_settings(_iteration_dir(root, latest), newest, args)
    older = [i for i in _complete_iterations(root) if latest is None or i < latest]
    return ([] if latest is None else [latest]) + (older if fallback else []), older, problem


def _check_settings(directory: Path, metadata: dict[str, Any], args) -> None:
    now = {name: getattr(args, name, None) for name in MUST_MATCH}
    saved = {name: metadata.get(name, _UNRECORDED.get(name)) for name in MUST_MATCH}
    mismatches = [
        f"{name}: checkpoint {saved[name]!r} vs now {now[name]!r}"
        for name in MUST_MATCH
        if json.loads(json.dumps(now[name])) != saved[name]
    ]
    if mismatches:
        raise CheckpointError(
            f"checkpoint {directory} was written with different settings:\n  "
            + "\n  ".join(mismatches)
            + "\nresume with the same model shape, number of ranks, --pipeline-model-parallel-size and "
            "--swiftmoe settings "
            "(or start a new run with another --save directory)"
        )


def _read_rank_file(root: Path, iteration: int, args) -> dict[str, Any]:
    """This rank's verified state of ``iteration`` (local: no collective)."""
    rank = dist.get_rank()
    directory = _iteration_dir(root, iteration)
    metadata_path = directory / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {metadata_path}: {error}; the checkpoint of iteration {iteration} is incomplete or corrupt"
        ) from error
    _check_settings(directory, metadata, args)
    rank_file = _rank_file(directory, rank)
    whose = f"{rank_file} (rank {rank}'s file of iteration {iteration})"
    files = metadata.get("files")
    expected_file = files.get(rank_file.name) if isinstance(files, dict) else None
    if expected_file is None:
        raise CheckpointError(
            f"{metadata_path} lists no size and checksum for {rank_file.name}, so {whose} cannot be verified: "
            "the checkpoint was written by an older version of this program or edited; start a new run"
        )
    if not rank_file.is_file():
        raise CheckpointError(f"{whose} is missing: the checkpoint is incomplete")
    size = rank_file.stat().st_size
    if size != expected_file["bytes"]:
        raise CheckpointError(
            f"{whose} is {'truncated' if size < expected_file['bytes'] else 'too long'}: {size} bytes, "
            f"{expected_file['bytes']} when saved; the checkpoint is corrupt"
        )
    checksum = sha256_file(rank_file)
    if checksum != expected_file["sha256"]:
        raise CheckpointError(
            f"{whose} has a wrong checksum (SHA-256 {checksum}, {expected_file['sha256']} when saved): "
            "the checkpoint is corrupt"
        )
    try:
        return torch.load(rank_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"refusing to load {whose}: {refusal_reason(error)}") from None
    except Exception as error:  # noqa: BLE001 - any other unpickling failure means a corrupt file
        raise CheckpointError(f"cannot load {whose}: {error}; the checkpoint file is corrupt") from error


def refusal_reason(error: pickle.UnpicklingError) -> str:
    """Why weights-only unpickling refused a file, without PyTorch's advice to load it with
    ``weights_only=False`` (which would run whatever code the file holds)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] + [""]
    reasons = [(found[0] + (f" {after}" if found[0].endswith(":") else "")).split(" Please use")[0].strip()
               for line, after in zip(lines, lines[1:]) if (found := re.search(r"\w*Unpickler error:.*", line))]
    reasons += [line for line in lines if line and "weights_only" not in line and "can still be loaded" not in line]
    return (
        f"weights-only unpickling rejects it ({(reasons or ['unpickling error'])[0]}): the file holds a Python "
        "object that checkpoints never contain, which could run code when loaded, or it is corrupt. Do not load "
        "checkpoints whose origin you do not trust"
    )


def load_checkpoint(root: str | Path, args, fallback: bool = False) -> tuple[int, dict[str, Any]] | None:
    """Collective: this rank's state of the newest checkpoint under ``root`` and its iteration,
    or None (on every rank) when nothing was saved there yet.

    Every rank verifies and reads its own file. If any rank cannot, every rank raises the same
    :class:`~megatron_swiftmoe.training.agreement.AgreedError`, which names the problem
    (incomplete, corrupt or unsafe file, different model shape / world size / strategy); with
    ``fallback`` every rank instead tries the next older complete iteration, down to the oldest.
    """
    root = Path(root)

    def listing():
        return _listing(root, args, fallback) if dist.get_rank() == 0 else None

    candidates, older, problem = agree(f"--load {root}: listing its checkpoints", listing, gather=True)[0]
    if problem is not None and not candidates:
        raise AgreedError(f"--load {root}: {problem}, and there is no complete checkpoint directory to fall back to")
    failures = [] if problem is None else [problem]
    for iteration in candidates:
        try:
            state = agree(f"--load {root}: loading iteration {iteration}",
                          lambda: _read_rank_file(root, iteration, args))
        except AgreedError as error:
            if not fallback:
                hint = (f"--load-fallback resumes from the newest older checkpoint that verifies (complete older "
                        f"iterations here: {', '.join(map(str, older))})" if older
                        else f"there is no older checkpoint under {root} to fall back to (with --load-fallback)")
                raise AgreedError(f"{error}\n{hint}") from None
            failures.append(str(error))
            if dist.get_rank() == 0:
                print(f"> --load-fallback: skipping iteration {iteration}: {error}", flush=True)
            continue
        return iteration, state
    if failures:
        raise AgreedError(f"--load {root} --load-fallback: no complete checkpoint verifies:\n  "
                          + "\n  ".join(failures))
    return None
