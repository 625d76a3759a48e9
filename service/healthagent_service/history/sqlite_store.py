"""The embedded store: one SQLite file in WAL mode.

SQLite allows one writer at a time. A turn's own writes (its start, its end, a minted session)
are a few rows by key, and are committed on the event loop's own connection at once: about
60 us each. Handed to a thread, each cost three times that in CPU, and under load far more, as
every statement took the GIL back from the busy loop (docs/benchmarks.md). That connection never
waits for the lock (busy timeout 0) and never checkpoints (an fsync). When another connection
holds the write lock (another `serve --workers` process, or this one's worker thread), the write
goes to the worker thread instead, like every read and every write whose size depends on the
data.

The worker commits in groups: every write queued since its last commit in one
`BEGIN IMMEDIATE` ... `COMMIT`, each in its own savepoint, so a write that fails is undone alone
and the others still commit. Every `CHECKPOINT_EVERY_COMMITS` commits on the loop it also
checkpoints the WAL in RESTART mode: holding the write lock, so writes arriving meanwhile queue
for the worker, and the next writer starts the WAL over. (A passive checkpoint beside ongoing
writes never caught up with them, and the WAL grew without end.)

A turn's records are all there or not at all, even if the process is killed mid-write, and a
write's caller resumes only once it is committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog

from healthagent_service.errors import HealthAgentError
from healthagent_service.history.models import (
    Conversation,
    ConversationPage,
    Message,
    NewTurn,
    Role,
    Status,
    TurnOutcome,
)
from healthagent_service.history.store import (
    ConversationStore,
    RevocationListener,
    check_page_size,
    decode_page_token,
    encode_page_token,
    history_unavailable,
    new_message_id,
    now,
)

log = structlog.get_logger(__name__)

_OPEN_TIMEOUT_SECONDS = 30.0  # as long as a write waits for the file's lock
# WAL frames are copied back into the file this often (SQLite's own default is about every
# 1,000 pages, and a turn writes about 8)
CHECKPOINT_EVERY_COMMITS = 100

# What a full disk, a file another process holds or cannot be written raise: UNAVAILABLE for
# the caller, like a lost database connection, not INTERNAL.
_OUTAGE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_NOMEM,
    }
)
T = TypeVar("T")
_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
    CREATE TABLE conversations (
        id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        upstream TEXT NOT NULL,
        upstream_id TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        next_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, id)
    );
    CREATE INDEX conversations_by_user ON conversations (user_id, updated_at DESC, id DESC);
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        text TEXT NOT NULL,
        status TEXT NOT NULL,
        tool_calls TEXT NOT NULL DEFAULT '[]',
        tool_call_id TEXT NOT NULL DEFAULT '',
        usage TEXT,
        error_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (user_id, conversation_id, seq),
        FOREIGN KEY (user_id, conversation_id) REFERENCES conversations (user_id, id)
            ON DELETE CASCADE
    );
    CREATE TABLE upstream_sessions (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX upstream_sessions_by_user ON upstream_sessions (user_id);
    """,
    ),
    (
        2,
        # revocations since a moment: another process catching up (a worker polling, a
        # listener reconnecting) without reading every session ever minted
        """
    CREATE INDEX upstream_sessions_by_revocation ON upstream_sessions (revoked_at)
        WHERE revoked_at IS NOT NULL;
    """,
    ),
]


def _ts(value: datetime) -> str:
    return value.isoformat()


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


class SQLiteStore(ConversationStore):
    """`ConversationStore` on a SQLite file."""

    def __init__(self, path: Path, *, revocation_poll_seconds: float | None = None) -> None:
        """`revocation_poll_seconds`: when several processes share the file (`serve --workers`),
        how often each looks for sessions another one revoked; None for a single process."""
        self._path = path
        self._revocation_poll_seconds = revocation_poll_seconds
        self._revocation_poller: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self._queued_writes: deque[_Write] = deque()
        self._writes_lock = threading.Lock()  # the queue and the flag, across the two threads
        self._committing = False  # a group commit is queued or running on the worker
        self.commits = 0  # transactions committed (each holds one or more writes)
        self._loop_db: sqlite3.Connection | None = None  # the loop's own, for small writes
        self._loop_commits_since_checkpoint = 0
        self._checkpoint_pending = False

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "store is not open"
            return work(self._db)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as exc:
            raise _outage_or(exc) from None

    async def _write(self, work: Callable[[sqlite3.Connection], T], *, small: bool = False) -> T:
        """Run `work` in a transaction and return its result once that is committed. `small`:
        `work` writes a few rows by key, so it may run on the loop (the largest, a turn's end,
        holds the answer's text: 100 KB of it is about 25 pages, a fifth of a millisecond)."""
        try:
            return await self._write_through(work, small=small)
        except sqlite3.Error as exc:
            raise _outage_or(exc) from None

    async def _write_through(self, work: Callable[[sqlite3.Connection], T], *, small: bool) -> T:
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

    def _commit_on_loop(self, db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
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

    def _finish_transaction(
        self, db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]
    ) -> T:
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

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            _private_file(self._path)
            db = sqlite3.connect(
                self._path,
                isolation_level=None,
                check_same_thread=False,
                timeout=_OPEN_TIMEOUT_SECONDS,
            )
            _enable_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process
            db.execute("PRAGMA foreign_keys=ON")
            return db

        self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        await self._write(_migrate)
        # Opened on the loop, which alone uses it. It never waits for the lock (busy timeout
        # 0: the write goes to the worker then) nor checkpoints (an fsync): the worker does.
        loop_db = sqlite3.connect(self._path, isolation_level=None, timeout=0)
        loop_db.execute("PRAGMA synchronous=NORMAL")
        loop_db.execute("PRAGMA foreign_keys=ON")
        loop_db.execute("PRAGMA wal_autocheckpoint=0")
        self._loop_db = loop_db
        # SQLite gives the WAL and shared-memory files the database's mode, less the umask
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self._path}{suffix}", 0o600)

    async def close(self) -> None:
        if self._revocation_poller is not None:
            self._revocation_poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revocation_poller
            self._revocation_poller = None
        if self._loop_db is not None:
            self._loop_db.close()
            self._loop_db = None
        if self._db is not None:
            await self._run(lambda db: db.close())
            self._db = None
        self._executor.shutdown(wait=True)

    async def schema_version(self) -> int:
        return await self._run(
            lambda db: int(db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])
        )

    async def has_conversation(self, user: str, conversation_id: str) -> bool:
        def query(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM conversations WHERE user_id = ? AND id = ?", (user, conversation_id)
            ).fetchone()
            return row is not None

        return await self._run(query)

    async def begin_turn(self, turn: NewTurn) -> str:
        assistant_id = new_message_id()
        key = (turn.user, turn.conversation_id)

        def write(db: sqlite3.Connection) -> str:
            stamp = _ts(now())
            row = db.execute(
                "SELECT next_seq FROM conversations WHERE user_id = ? AND id = ?", key
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO conversations (id, user_id, upstream, upstream_id, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        turn.conversation_id,
                        turn.user,
                        turn.upstream,
                        turn.upstream_id,
                        stamp,
                        stamp,
                    ),
                )
                seq = 0
            else:
                seq = int(row[0])
            insert = (
                "INSERT INTO messages (id, user_id, conversation_id, seq, role, text,"
                " status, tool_call_id, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )
            db.execute(
                insert,
                (
                    new_message_id(),
                    *key,
                    seq,
                    turn.role.value,
                    turn.text,
                    Status.COMPLETE.value,
                    turn.tool_call_id,
                    stamp,
                    stamp,
                ),
            )
            db.execute(
                insert,
                (
                    assistant_id,
                    *key,
                    seq + 1,
                    Role.ASSISTANT.value,
                    "",
                    Status.INCOMPLETE.value,
                    "",
                    stamp,
                    stamp,
                ),
            )
            db.execute(
                "UPDATE conversations SET next_seq = ?, updated_at = ?, upstream_id = ?"
                " WHERE user_id = ? AND id = ?",
                (seq + 2, stamp, turn.upstream_id, *key),
            )
            return assistant_id

        return await self._write(write, small=True)

    async def finish_turn(
        self, user: str, conversation_id: str, message_id: str, outcome: TurnOutcome
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            stamp = _ts(now())
            db.execute(
                "UPDATE messages SET status = ?, text = ?, tool_calls = ?, usage = ?,"
                " error_reason = ?, updated_at = ? WHERE id = ?",
                (
                    outcome.status.value,
                    outcome.text,
                    json.dumps(outcome.tool_calls),
                    json.dumps(outcome.usage) if outcome.usage else None,
                    outcome.error_reason,
                    stamp,
                    message_id,
                ),
            )
            db.execute(
                "UPDATE conversations SET updated_at = ?,"
                " upstream_id = CASE WHEN ? = '' THEN upstream_id ELSE ? END,"
                " title = CASE WHEN ? = '' THEN title ELSE ? END WHERE user_id = ? AND id = ?",
                (
                    stamp,
                    outcome.upstream_id,
                    outcome.upstream_id,
                    outcome.title,
                    outcome.title,
                    user,
                    conversation_id,
                ),
            )

        await self._write(write, small=True)

    async def get_conversation(self, user: str, conversation_id: str) -> Conversation | None:
        def query(db: sqlite3.Connection) -> Conversation | None:
            row = db.execute(
                "SELECT id, user_id, upstream, upstream_id, title, created_at, updated_at"
                " FROM conversations WHERE id = ? AND user_id = ?",
                (conversation_id, user),
            ).fetchone()
            if row is None:
                return None
            messages = [
                _message(m)
                for m in db.execute(
                    "SELECT id, conversation_id, seq, role, text, status, created_at, updated_at,"
                    " tool_calls, tool_call_id, usage, error_reason FROM messages"
                    " WHERE user_id = ? AND conversation_id = ? ORDER BY seq",
                    (user, conversation_id),
                )
            ]
            return _conversation(row, messages)

        return await self._run(query)

    async def list_conversations(
        self, user: str, page_size: int, page_token: str
    ) -> ConversationPage:
        size = check_page_size(page_size)
        after = decode_page_token(user, page_token)

        def query(db: sqlite3.Connection) -> ConversationPage:
            sql = (
                "SELECT id, user_id, upstream, upstream_id, title, created_at, updated_at"
                " FROM conversations WHERE user_id = ?"
            )
            args: list[Any] = [user]
            if after is not None:
                sql += " AND (updated_at < ? OR (updated_at = ? AND id < ?))"
                args += [_ts(after[0]), _ts(after[0]), after[1]]
            sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
            rows = db.execute(sql, [*args, size + 1]).fetchall()
            conversations = [_conversation(r, []) for r in rows[:size]]
            token = ""
            if len(rows) > size:
                last = conversations[-1]
                token = encode_page_token(user, last.updated_at, last.id)
            return ConversationPage(conversations, token)

        return await self._run(query)

    async def delete_conversation(self, user: str, conversation_id: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM conversations WHERE id = ? AND user_id = ?", (conversation_id, user)
            )
            return cursor.rowcount > 0

        return await self._write(write)

    async def record_session(
        self, session_id: str, user: str, kind: str, expires_at: datetime
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO upstream_sessions (id, user_id, kind, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (session_id, user, kind, _ts(expires_at), _ts(now())),
            )

        await self._write(write, small=True)

    async def revoke_sessions(self, user: str) -> list[tuple[str, str]]:
        def write(db: sqlite3.Connection) -> list[tuple[str, str]]:
            # After every stamp already written, even if the clock stepped back: other
            # processes read revocations as "stamped after the newest one seen".
            newest = _newest_revocation(db)
            at = now()
            if newest:
                at = max(at, _dt(newest) + timedelta(microseconds=1))
            stamp = _ts(at)
            rows = db.execute(
                "SELECT id, kind FROM upstream_sessions WHERE user_id = ? AND revoked_at IS NULL"
                " AND expires_at > ?",
                (user, stamp),
            ).fetchall()
            db.execute(
                "UPDATE upstream_sessions SET revoked_at = ? WHERE user_id = ?"
                " AND revoked_at IS NULL",
                (stamp, user),
            )
            return [(str(r[0]), str(r[1])) for r in rows]

        return await self._write(write)

    async def listen_revocations(self, listener: RevocationListener) -> None:
        if self._revocation_poll_seconds is None or self._revocation_poller is not None:
            return  # a single process (no one else revokes), or listening already
        since = await self._run(_newest_revocation)
        self._revocation_poller = asyncio.create_task(self._poll_revocations(listener, since))

    async def _poll_revocations(self, listener: RevocationListener, since: str) -> None:
        """SQLite has no NOTIFY: read the revocations committed since the newest one seen.
        Stamps are taken inside the write transaction, which holds the file's write lock, so
        they are in commit order and none can appear later with an older stamp."""
        assert self._revocation_poll_seconds is not None
        while True:
            await asyncio.sleep(self._revocation_poll_seconds)
            try:
                revoked = await self._run(functools.partial(_revocations_after, since=since))
            except (sqlite3.Error, HealthAgentError) as exc:  # busy, or the disk: next time
                log.warning("revocation poll failed", error=type(exc).__name__)
                continue
            for user, stamp in revoked:
                since = max(since, stamp)
                try:
                    await listener(user)
                except Exception:
                    log.exception("revocation listener failed", user=user)

    async def is_revoked(self, session_id: str) -> bool:
        def query(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT revoked_at FROM upstream_sessions WHERE id = ?", (session_id,)
            ).fetchone()
            return row is not None and row[0] is not None

        return await self._run(query)


def _outage_or(exc: sqlite3.Error) -> Exception:
    """`history_unavailable` for a full disk, an unwritable or busy file; else `exc`."""
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _OUTAGE_CODES:
        return history_unavailable(exc)
    return exc


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


def _private_file(path: Path) -> None:
    """Create the data directory (0700) and the database file (0600) readable by this user
    only, whatever the umask: the history holds health conversations. A directory that
    already exists keeps its mode (an operator may have set it); the database is made 0600."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another worker made it meanwhile
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)  # mkdir's mode passes through the umask
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


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


def _newest_revocation(db: sqlite3.Connection) -> str:
    row = db.execute(
        "SELECT max(revoked_at) FROM upstream_sessions WHERE revoked_at IS NOT NULL"
    ).fetchone()
    return str(row[0]) if row[0] is not None else ""


def _revocations_after(db: sqlite3.Connection, since: str) -> list[tuple[str, str]]:
    """(user, newest revocation stamp) for each user with sessions revoked after `since`."""
    rows = db.execute(
        "SELECT user_id, max(revoked_at) FROM upstream_sessions WHERE revoked_at > ?"
        " GROUP BY user_id",
        (since,),
    ).fetchall()
    return [(str(user), str(stamp)) for user, stamp in rows]


def _migrate(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL)"
    )
    applied = {int(r[0]) for r in db.execute("SELECT version FROM schema_migrations")}
    for version, script in MIGRATIONS:
        if version in applied:
            continue
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
        db.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
            (version, _ts(now())),
        )


def _conversation(row: Any, messages: list[Message]) -> Conversation:
    return Conversation(
        id=row[0],
        user=row[1],
        upstream=row[2],
        upstream_id=row[3],
        title=row[4],
        created_at=_dt(row[5]),
        updated_at=_dt(row[6]),
        messages=messages,
    )


def _message(row: Any) -> Message:
    return Message(
        id=row[0],
        conversation_id=row[1],
        seq=int(row[2]),
        role=Role(row[3]),
        text=row[4],
        status=Status(row[5]),
        created_at=_dt(row[6]),
        updated_at=_dt(row[7]),
        tool_calls=json.loads(row[8] or "[]"),
        tool_call_id=row[9],
        usage=json.loads(row[10]) if row[10] else None,
        error_reason=row[11],
    )
