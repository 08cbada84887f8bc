"""Every rank agrees on the outcome of a step that can fail on one rank alone.

A rank whose step raised must not wait in a collective that the other ranks never enter, and
the other ranks must not go on as if nothing had happened. So such a step (reading its
checkpoint file, writing it, closing the metrics file) runs locally on every rank, with no
collective inside it, and then every rank exchanges its outcome, in the normal path of every
rank: when every step succeeded, every rank goes on; otherwise every rank raises the same
:class:`AgreedError`, with the first failing rank's message, which the program prints once
(rank 0) before every rank exits non-zero.

Exceptions anywhere else (a bug, an out-of-memory error in a training step) are not agreed on:
that rank exits at once without entering any collective, and the others end too: torchrun stops
them, gloo reports the lost peer, or the collective they wait in times out
(``--distributed-timeout-minutes``).
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class ExplainedError(RuntimeError):
    """An error whose message says what is wrong and what to do: no traceback is needed."""


class AgreedError(ExplainedError):
    """Raised on every rank at once, with the same message."""


def _explained(error: BaseException) -> bool:
    return isinstance(error, (ExplainedError, SystemExit))  # SystemExit("error: ...") explains itself


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return str(error.code).removeprefix("error: ")
    if isinstance(error, ExplainedError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def agree(what: str, step: Callable[[], T], gather: bool = False) -> T | list[Any]:
    """Collective: run the local ``step`` on this rank, then agree with every rank on the outcome.

    Every rank must call it at the same point, with no collective inside ``step``. Returns this
    rank's result when every rank's step succeeded (``gather=True``: every rank's result, in
    rank order; only for small values); otherwise raises :class:`AgreedError` on every rank
    with the first failing rank's message. A failure that explains itself (:class:`ExplainedError`,
    ``SystemExit``) is reported by its message; any other (a bug) also prints its traceback on the
    rank where it happened.
    """
    try:
        result, message = step(), None
    except (Exception, SystemExit) as error:  # noqa: BLE001 - every failure is reported to the other ranks
        result, message = None, _describe(error)
        if not _explained(error):
            print(f"rank {dist.get_rank()}: {what} failed:", file=sys.stderr)
            traceback.print_exc()
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (message, result if gather else None))
    failed = [rank for rank, (text, _) in enumerate(outcomes) if text is not None]
    if failed:
        others = f" (and on {len(failed) - 1} other rank{'s' * (len(failed) > 2)})" if len(failed) > 1 else ""
        raise AgreedError(f"{what} failed on rank {failed[0]}{others}: {outcomes[failed[0]][0]}")
    return [value for _, value in outcomes] if gather else result
