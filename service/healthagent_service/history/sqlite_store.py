"""The embedded store: one SQLite file in WAL mode. The schema, the queries and the rows' mapping
are here; where each write runs, and how writes are grouped, is `SQLiteEngine`'s
(`history/sqlite_engine.py`). A turn's start and end, and a minted session, are small writes,
which the engine may commit on the event loop.

A turn's records are all there or not at all, even if the process is killed mid-write, and a
write's caller resumes only once it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable
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
from healthagent_service.history.sqlite_engine import SQLiteEngine
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
        self._engine = SQLiteEngine(path)

    @property
    def commits(self) -> int:
        """Transactions committed (each holds one or more writes)."""
        return self._engine.commits

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._engine.read(work)
        except sqlite3.Error as exc:
            raise _outage_or(exc) from None

    async def _write(self, work: Callable[[sqlite3.Connection], T], *, small: bool = False) -> T:
        """Run `work` in a transaction and return its result once that is committed. `small`:
        `work` writes a few rows by key (see `SQLiteEngine.write`)."""
        try:
            return await self._engine.write(work, small=small)
        except sqlite3.Error as exc:
            raise _outage_or(exc) from None

    async def open(self) -> None:
        await self._engine.open()
        await self._write(_migrate)
        # after the migration, which created the WAL files the engine makes private
        self._engine.open_loop_connection()

    async def close(self) -> None:
        if self._revocation_poller is not None:
            self._revocation_poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revocation_poller
            self._revocation_poller = None
        try:
            await self._engine.close()
        except sqlite3.Error as exc:
            raise _outage_or(exc) from None

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
