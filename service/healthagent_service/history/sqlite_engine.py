"""The SQLite file's write engine: its connections, its worker thread, and where each write runs.

SQLite allows one writer at a time. A small write (a few rows by key: a turn's start, its end, a
minted session) is committed on the event loop's own connection at once: about 60 us each.
Handed to a thread, each cost three times that in CPU, and under load far more, as every
statement took the GIL back from the busy loop (docs/decisions/0005-loop-side-sqlite-writes.md).
That connection never waits for the lock (busy timeout 0) and never checkpoints (an fsync).
When another connection holds the write lock (another `serve --workers` process, or this one's
worker thread), the write goes to the worker thread instead, like every read and every write
whose size depends on the data.

The worker commits in groups: every write queued since its last commit in one
`BEGIN IMMEDIATE` ... `COMMIT`, each in its own savepoint, so a write that fails is undone alone
and the others still commit. Every `CHECKPOINT_EVERY_COMMITS` commits on the loop it also
checkpoints the WAL in RESTART mode: holding the write lock, so writes arriving meanwhile queue
for the worker, and the next writer starts the WAL over. (A passive checkpoint beside ongoing
writes never caught up with them, and the WAL grew without end.)

A write is all there or not at all, even if the process is killed mid-write, and its caller
resumes only once it is committed. The engine knows no schema: a write or a read is a function
of a `sqlite3.Connection`, and what it raises reaches its caller unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from healthagent_service.private_files import private_file

log = structlog.get_logger(__name__)

_OPEN_TIMEOUT_SECONDS = 30.0  # as long as a write on the worker waits for the file's lock
# WAL frames are copied back into the file this often (SQLite's own default is about every
# 1,000 pages, and a turn writes about 8)
CHECKPOINT_EVERY_COMMITS = 100

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]
_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class SQLiteEngine:
    """One SQLite file's connections: the worker thread's, for reads and queued writes, and the
    loop's own, for small writes. Open with `open`, then `open_loop_connection`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self._queued_writes: deque[_Write] = deque()
        self._writes_lock = threading.Lock()  # the queue and the flag, across the two threads
        self._committing = False  # a group commit is queued or running on the worker
        self.commits = 0  # transactions committed (each holds one or more writes)
        self._loop_db: sqlite3.Connection | None = None  # the loop's own, for small writes
        self._loop_commits_since_checkpoint = 0
        self._checkpoint_pending = False

    async def open(self) -> None:
        """Open the worker's connection, creating the file (readable by this user only) in WAL
        mode. Until `open_loop_connection`, every write goes to the worker."""

        def connect() -> sqlite3.Connection:
            private_file(self.path)
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=_OPEN_TIMEOUT_SECONDS,
            )
            _enable_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process
            db.execute("PRAGMA foreign_keys=ON")
            return db

        self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    def open_loop_connection(self) -> None:
        """Open the loop's connection for small writes. (The WAL and shared-memory files need
        no chmod: SQLite gives them the database file's mode, past the umask.)"""
        # Opened on the loop, which alone uses it. It never waits for the lock (busy timeout
        # 0: the write goes to the worker then) nor checkpoints (an fsync): the worker does.
        loop_db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        loop_db.execute("PRAGMA synchronous=NORMAL")
        loop_db.execute("PRAGMA foreign_keys=ON")
        loop_db.execute("PRAGMA wal_autocheckpoint=0")
        self._loop_db = loop_db

    async def close(self) -> None:
        """Close both connections, after the writes already handed to the worker."""
        if self._loop_db is not None:
            self._loop_db.close()
            self._loop_db = None
        if self._db is not None:
            await self.read(lambda db: db.close())
            self._db = None
        self._executor.shutdown(wait=True)

    async def read(self, work: Work[T]) -> T:
        """Run `work` on the worker's connection, outside any transaction of the engine's."""

        def call() -> T:
            assert self._db is not None, "store is not open"
            return work(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def write(self, work: Work[T], *, small: bool = False) -> T:
        """Run `work` in a transaction and return its result once that is committed, or raise
        what `work` raised with nothing of it written. `small`: `work` writes a few rows by
        key, so it may run on the loop (the largest, a turn's end, holds the answer's text:
        100 KB of it is about 25 pages, a fifth of a millisecond)."""
        if small and self._loop_db is not None:
            with contextlib.suppress(_WriteLockTakenError):  # then the worker waits for the lock
                return self._commit_on_loop(self._loop_db, work)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        with self._writes_lock:
            self._queued_writes.append((work, done))
            start = not self._committing
            self._committing = True
        if start:
            # submitted, not `run_in_executor`: its asyncio future, which nothing awaits, would
            # cost the loop a second wake-up from the worker thread per group
            self._executor.submit(self._commit_groups, loop).add_done_callback(_log_failure)
        return await done

    def _commit_groups(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker: commit what is queued, in groups, until nothing is."""
        while True:
            with self._writes_lock:
                group = list(self._queued_writes)
                self._queued_writes.clear()
                if not group:
                    self._committing = False
                    return
            outcomes = self._commit_group(group)
            loop.call_soon_threadsafe(_settle, outcomes)

    def _commit_group(self, group: list[_Write]) -> list[tuple[asyncio.Future[Any], Any, bool]]:
        db = self._db
        if db is None:
            error = RuntimeError("store is not open")
            return [(done, error, False) for _, done in group]
        if len(group) == 1:  # alone in its transaction: no savepoint needed to undo it alone
            return [self._commit_one(db, group[0])]
        results: list[tuple[asyncio.Future[Any], Any, bool]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for work, done in group:
                db.execute("SAVEPOINT write")
                try:
                    result = work(db)
                except Exception as exc:  # this write alone is undone; the group goes on
                    db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
                    results.append((done, exc, False))
                    continue
                db.execute("RELEASE write")
                results.append((done, result, True))
            db.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the group was written
            if db.in_transaction:
                # a broken connection cannot roll back either; the next group will say so
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            return [(done, exc, False) for _, done in group]
        return results

    def _commit_on_loop(self, db: sqlite3.Connection, work: Work[T]) -> T:
        """Commit `work` on the loop's connection; raises `_WriteLockTakenError` when another
        connection holds the write lock (nothing was done then), or what `work` raises, with
        nothing of it written."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                raise _WriteLockTakenError from None
            raise
        result = self._finish_transaction(db, work)
        self._loop_commits_since_checkpoint += 1
        if self._loop_commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS:
            self._checkpoint_soon()
        return result

    def _finish_transaction(self, db: sqlite3.Connection, work: Work[T]) -> T:
        """Run `work` in the transaction just begun and commit it, or roll it back and raise."""
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self.commits += 1
        return result

    def _checkpoint_soon(self) -> None:
        """Have the worker copy the WAL back into the file; at most one queued at a time."""
        if self._checkpoint_pending:
            return
        self._checkpoint_pending = True
        self._loop_commits_since_checkpoint = 0
        self._executor.submit(self._checkpoint).add_done_callback(_log_failure)

    def _checkpoint(self) -> None:
        try:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(RESTART)")
        finally:
            self._checkpoint_pending = False

    def _commit_one(
        self, db: sqlite3.Connection, write: _Write
    ) -> tuple[asyncio.Future[Any], Any, bool]:
        work, done = write
        try:
            db.execute("BEGIN IMMEDIATE")
            return (done, self._finish_transaction(db, work), True)
        except Exception as exc:  # nothing of it was written
            return (done, exc, False)


class _WriteLockTakenError(Exception):
    """Another connection holds the file's write lock."""


def _log_failure(work: concurrent.futures.Future[None]) -> None:
    """On the worker: a group commit loop or a checkpoint that failed outside any write (a
    commit loop's callers would wait for ever, so it must at least be seen)."""
    if not work.cancelled() and work.exception() is not None:
        log.error("history writer failed", error=repr(work.exception()))


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    """On the loop: hand each write's caller its result or its exception."""
    for done, value, ok in outcomes:
        if done.cancelled():
            continue  # the caller left; the write stands (or failed) all the same
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch a new file to WAL (a no-op once it is). The switch takes the file exclusively and
    SQLite answers "locked" at once rather than through the busy timeout, so workers opening a
    new file together wait for each other here."""
    deadline = time.monotonic() + _OPEN_TIMEOUT_SECONDS
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
