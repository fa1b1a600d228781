"""Clocks: where the engine's "now" comes from.

Everything time-dependent in the engine (stage boundaries, report times, time-to-live)
reads one clock. The system clock serves production; a scaled clock runs hours in
seconds for demos and trials; a manual clock lets tests decide when time passes.
All clocks give Unix time in seconds (UTC).
"""

from __future__ import annotations

import asyncio
import threading
import time


class Clock:
    """The system clock."""

    #: Simulated seconds per real second.
    speed = 1.0

    def now(self) -> float:
        """Unix time in seconds."""
        return time.time()

    async def sleep_until(self, when: float) -> None:
        """Returns once :meth:`now` has reached ``when``."""
        while (left := when - self.now()) > 0:
            await asyncio.sleep(min(left / self.speed, 1.0))


class ScaledClock(Clock):
    """Time that runs ``speed`` times faster than real time, from ``start`` (default: the
    real time now). With ``speed=360`` three hours pass in 30 seconds."""

    def __init__(self, speed: float, start: float | None = None) -> None:
        if not (isinstance(speed, int | float) and 0 < speed <= 1e6):
            raise ValueError(f"speed must be above 0 and at most 1e6, got {speed!r}")
        self.speed = float(speed)
        self._start = time.time() if start is None else float(start)
        self._origin = time.monotonic()

    def now(self) -> float:
        return self._start + (time.monotonic() - self._origin) * self.speed


class ManualClock(Clock):
    """Time that stands still until :meth:`advance` or :meth:`set` moves it; safe to move
    from any thread. Sleepers notice within :attr:`poll_s` real seconds."""

    poll_s = 0.005

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Moves time forward by ``seconds``; returns the new time."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be 0 or more, got {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, when: float) -> None:
        """Moves time forward to ``when`` (never back)."""
        with self._lock:
            if when < self._now:
                raise ValueError(f"time cannot go back from {self._now} to {when}")
            self._now = float(when)

    async def sleep_until(self, when: float) -> None:
        while self._now < when:
            await asyncio.sleep(self.poll_s)
