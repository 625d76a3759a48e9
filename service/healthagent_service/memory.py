"""Gives memory back to the operating system after load.

glibc's malloc keeps freed heap pages, so a Python service's resident memory stays at its peak
after a burst even when nothing leaked. Every little while, once the service is quiet, ask
malloc to return what it no longer uses (`malloc_trim`). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


async def trim_memory_when_quiet(
    active_streams: Callable[[], int], interval_seconds: float = 5.0
) -> None:
    """Run forever: every `interval_seconds`, if fewer than a handful of streams are open,
    return freed heap memory to the OS."""
    trim = _malloc_trim()
    if trim is None:
        return
    was_busy = True
    while True:
        await asyncio.sleep(interval_seconds)
        quiet = active_streams() <= 8
        if quiet and was_busy:  # once per quiet spell, right after a busy one
            trim(0)
        was_busy = not quiet
