"""SQLite helpers for the store's and the write engine's tests: a rival writer, a loop ticker."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the file's write lock, as another process (another
    `serve --workers` worker) does while it commits."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()


@dataclass
class LoopTicks:
    """How many times the event loop ran a 10 ms ticker: it stays low if the loop is blocked."""

    count: int = 0


@contextlib.asynccontextmanager
async def loop_ticks() -> AsyncIterator[LoopTicks]:
    ticks = LoopTicks()

    async def tick() -> None:
        while True:
            ticks.count += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        yield ticks
    finally:
        ticker.cancel()
