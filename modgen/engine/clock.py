"""Clocks: where every timestamp of a run comes from.

The executor owns the clock: the wall clock when a real model runs, a virtual clock advanced by
each step's predicted time when a cost model stands in for it. Request arrivals, first tokens,
each token, finishes, and the bench's send and receive times all read it, so real and
simulated runs report alike. ``Clock.run`` runs a coroutine on an event loop that keeps the
clock's time: with a virtual clock, ``asyncio.sleep`` waits in virtual time and the loop jumps
to its next timer whenever nothing is ready, so closed loops, open-loop arrivals and trace
replay run unchanged in simulation, as fast as the machine can compute them.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Clock(ABC):
    """A source of time in seconds."""

    virtual: bool = False
    """Whether time moves only when told to (a simulation); steps then run inline, not in a
    worker thread."""

    @abstractmethod
    def now(self) -> float:
        """The current time."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """An event loop whose time is this clock's."""
        return asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on a new event loop of this clock (as ``asyncio.run``)."""
        loop = self.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()


class WallClock(Clock):
    """Real time (``time.perf_counter``)."""

    def now(self) -> float:
        return time.perf_counter()


class VirtualClock(Clock):
    """Simulated time: starts at ``start`` and moves only by ``advance``."""

    virtual = True

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._t += seconds

    def advance_to(self, t: float) -> None:
        """Move time forward to ``t`` (no-op if it is already later)."""
        self._t = max(self._t, t)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _VirtualLoop(self)


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that never sleeps: where the loop would wait for its next timer, the virtual
    clock jumps to it (real I/O that is ready is still served; with no timer at all it waits for
    real, e.g. for a worker thread)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            return super().select(None)
        self.clock.advance(timeout)
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_JumpingSelector(clock))
        self._clock = clock

    def time(self) -> float:
        return self._clock.now()
