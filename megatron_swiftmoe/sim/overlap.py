"""Overlap windows: how much of a rank's background communication hides behind its compute.

A rank's compute stream runs *segments* (compute, or a token all-to-all that occupies one
link) in a fixed order; background transfers (gradient reductions, parameter gathers) are
*released* at points of that order and *needed* at others. :class:`Link` serves the released
transfers **one at a time**, non-preemptively, earliest need first. A transfer progresses
while the compute stream computes (that time is *hidden*) or while the stream waits for it
(*exposed*: the stream is stalled); it makes no progress during a token all-to-all on the same
link class ("inter" node or "intra" node), which that all-to-all occupies. Nothing else is
shared: compute runs at full speed beside a transfer (the caller may charge a slowdown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["Transfer", "Link"]

_EPS = 1e-15


@dataclass
class Transfer:
    """One background collective: ``seconds`` of link time, of kind ``part``, over ``link``
    ("inter" | "intra"), served in order of ``need`` (smaller first)."""

    part: str
    seconds: float
    link: str
    need: float
    done: float = 0.0
    exposed: float = 0.0

    @property
    def finished(self) -> bool:
        return self.done >= self.seconds - _EPS

    @property
    def hidden(self) -> float:
        return self.done - self.exposed


class Link:
    """A rank's background-communication queue (see the module docstring)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.stalled = 0.0
        self._pending: list[Transfer] = []
        self._current: Optional[Transfer] = None

    def release(self, transfers: Iterable[Transfer]) -> None:
        self._pending.extend(t for t in transfers if t.seconds > 0)
        self._pending.sort(key=lambda t: t.need)

    def run(self, seconds: float, busy: Optional[str] = None) -> None:
        """The compute stream spends ``seconds`` on a segment; ``busy``: the link class a token
        all-to-all occupies during it (None for compute)."""
        left = seconds
        while left > _EPS:
            item = self._next()
            if item is None or item.link == busy:
                break
            step = min(left, item.seconds - item.done)
            item.done += step
            left -= step
            if item.finished:
                self._current = None
        self.now += seconds

    def wait(self, transfers: Iterable[Transfer]) -> float:
        """The compute stream waits until every one of ``transfers`` (released before) is done;
        returns the stall."""
        stall = 0.0
        for target in sorted(transfers, key=lambda t: t.need):
            while not target.finished:
                item = self._next()
                if item is None:
                    raise RuntimeError(f"waiting for a {target.part} transfer that was never released")
                step = item.seconds - item.done
                item.done = item.seconds
                item.exposed += step
                stall += step
                self._current = None
        self.now += stall
        self.stalled += stall
        return stall

    def _next(self) -> Optional[Transfer]:
        if self._current is None and self._pending:
            self._current = self._pending.pop(0)
        return self._current
