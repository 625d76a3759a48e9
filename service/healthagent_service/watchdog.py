"""Coarse deadlines for many long-lived waits, checked by one periodic timer.

A relayed chunk waits twice (for the upstream's next bytes, for the caller to take the message),
and each wait has a limit measured in tens of seconds. One asyncio timer per wait (`call_later`
and its `cancel`, or `asyncio.timeout`'s reschedule) is two operations on the loop's timer heap
per chunk, a cost that grows with the open streams (docs/decisions/0006-watchdog.md). Here a
wait sets a number on an object registered once per stream, and one timer per watchdog looks at
all of them every `resolution` seconds: a deadline fires between its moment and `resolution`
later, which limits this far above the resolution do not notice.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

NOT_ARMED = math.inf


class Deadline:
    """One watched wait. Set `at` (in the loop's clock) before waiting, `NOT_ARMED` after."""

    __slots__ = ("at", "expired", "on_expiry")

    def __init__(self, on_expiry: Callable[[], object]) -> None:
        self.at = NOT_ARMED
        self.expired = False
        self.on_expiry = on_expiry


class Watchdog:
    """Calls a `Deadline`'s `on_expiry` once, soon after its `at` has passed."""

    def __init__(self, resolution: float = 0.25) -> None:
        self.resolution = resolution
        self._watched: set[Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, deadline: Deadline) -> None:
        """Start watching `deadline` (armed or not); `forget` it when its stream ends."""
        self._watched.add(deadline)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.resolution, self._tick)

    def forget(self, deadline: Deadline) -> None:
        self._watched.discard(deadline)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = [d for d in self._watched if d.at <= now]
        try:
            for deadline in expired:
                self._watched.discard(deadline)
                deadline.expired = True
                deadline.on_expiry()
        finally:
            self._timer = loop.call_later(self.resolution, self._tick) if self._watched else None
