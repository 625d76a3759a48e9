"""Gives memory back to the operating system after load.

glibc's malloc keeps freed heap pages, so a Python service's resident memory stays at its peak
after a burst even when nothing leaked. Every little while, once the service is quiet, collect
reference cycles and ask malloc to return what it no longer uses (`malloc_trim`). Elsewhere than
glibc the trim does nothing (docs/decisions/0007-malloc-and-gc-settings.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (0: leave glibc's default of 8 per core).

    Every thread that allocates (gRPC's, the SQLite writer, the DNS resolver's) otherwise gets
    an arena of its own, and memory freed in one arena is not reused by another: under load
    the service's resident memory crept up round after round with the default and levelled off
    with two arenas (docs/reliability.md). Call it before threads start. True when applied.
    """
    if arenas <= 0:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))


def tune_garbage_collector(gen0_threshold: int) -> None:
    """Exempt everything alive now (modules, descriptors, settings) from collections, and, when
    `gen0_threshold` is above 0, collect the youngest generation every `gen0_threshold`
    allocations instead of Python's 700.

    Raising it to 20,000 served about 5% more MintSession requests a second, but in the soak it
    let cyclic garbage pile up between collections (peaks of 650k live blocks against 450k) and
    left resident memory 12% above its baseline instead of 5% (docs/reliability.md), so the
    default leaves Python's threshold alone. Call it once, after the imports, before serving.
    """
    if gen0_threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(gen0_threshold, older, oldest)
    gc.freeze()


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
            # Cycles (an exception and the frames it holds, from every failed or cancelled
            # turn) are only freed by a full collection; collect them first so the trim can
            # give their pages back. A few tens of ms, once, while almost nothing runs.
            gc.collect()
            trim(0)
        was_busy = not quiet
