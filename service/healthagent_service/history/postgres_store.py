"""The shared store: PostgreSQL through asyncpg (Supabase's database works as it is).

Several service replicas may share one database: a turn locks its conversation row
(`SELECT ... FOR UPDATE`) to take the next message numbers, migrations run under an advisory
lock, and revocations are announced to every replica with LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import asyncpg
import structlog

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

REVOCATION_CHANNEL = "healthagent_revocations"
LISTENER_APPLICATION_NAME = "healthagent-revocation-listener"
_LISTEN_CHECK_SECONDS = 2.0
_LISTEN_CHECK_MARGIN = timedelta(seconds=10)
# A database that takes longer than this for one of these small statements is as good as down.
_COMMAND_TIMEOUT_SECONDS = 10.0
_CONNECT_TIMEOUT_SECONDS = 5.0
# What a lost or refused connection raises: the caller is told UNAVAILABLE, not INTERNAL.
_OUTAGES = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08, and a connection that is gone
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shut down, terminated
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections
    asyncpg.InterfaceError,  # "connection is closed"
)
P = ParamSpec("P")
T = TypeVar("T")


def _unavailable_on_outage(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except _OUTAGES as exc:
            raise history_unavailable(exc) from None

    return call


_MIGRATION_LOCK = 0x4845414C  # "HEAL": serializes replicas migrating at the same time
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # fullmatch: `$` allows a final newline

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
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
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
        tool_calls JSONB NOT NULL DEFAULT '[]',
        tool_call_id TEXT NOT NULL DEFAULT '',
        usage JSONB,
        error_reason TEXT NOT NULL DEFAULT '',
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        UNIQUE (user_id, conversation_id, seq),
        FOREIGN KEY (user_id, conversation_id) REFERENCES conversations (user_id, id)
            ON DELETE CASCADE
    );
    CREATE TABLE upstream_sessions (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        revoked_at TIMESTAMPTZ
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


class PostgresStore(ConversationStore):
    """`ConversationStore` on PostgreSQL, in its own schema."""

    def __init__(self, dsn: str, schema: str = "healthagent", pool_size: int = 10) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema name {schema!r} must match {_SCHEMA_NAME.pattern}")
        self._dsn = dsn
        self._schema = schema
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._notified: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._listening_since = now()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    async def open(self) -> None:
        setup = await asyncpg.connect(self._dsn, timeout=_CONNECT_TIMEOUT_SECONDS)
        try:
            async with setup.transaction():
                await setup.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await setup.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
                await setup.execute(f"SET LOCAL search_path TO {self._schema}")
                await _migrate(setup)
        finally:
            await setup.close()
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            timeout=_CONNECT_TIMEOUT_SECONDS,
            command_timeout=_COMMAND_TIMEOUT_SECONDS,
            # the schema in the name: an operator (or a test) can tell whose connections these are
            server_settings={
                "search_path": self._schema,
                "application_name": f"healthagent/{self._schema}",
            },
        )

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @_unavailable_on_outage
    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    @_unavailable_on_outage
    async def schema_version(self) -> int:
        return int(await self.pool.fetchval("SELECT max(version) FROM schema_migrations"))

    @_unavailable_on_outage
    async def has_conversation(self, user: str, conversation_id: str) -> bool:
        found = await self.pool.fetchval(
            "SELECT 1 FROM conversations WHERE user_id = $1 AND id = $2", user, conversation_id
        )
        return found is not None

    @_unavailable_on_outage
    async def begin_turn(self, turn: NewTurn) -> str:
        assistant_id = new_message_id()
        stamp = now()
        async with self.pool.acquire() as db, db.transaction():
            await db.execute(
                "INSERT INTO conversations (id, user_id, upstream, upstream_id, created_at,"
                " updated_at) VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT DO NOTHING",
                turn.conversation_id,
                turn.user,
                turn.upstream,
                turn.upstream_id,
                stamp,
            )
            # The row lock numbers this conversation's messages one turn at a time, whichever
            # replica the turns arrive on.
            seq = int(
                await db.fetchval(
                    "SELECT next_seq FROM conversations WHERE user_id = $1 AND id = $2 FOR UPDATE",
                    turn.user,
                    turn.conversation_id,
                )
            )
            await db.executemany(
                "INSERT INTO messages (id, user_id, conversation_id, seq, role, text, status,"
                " tool_call_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
                " $9, $9)",
                [
                    (
                        new_message_id(),
                        turn.user,
                        turn.conversation_id,
                        seq,
                        turn.role.value,
                        turn.text,
                        Status.COMPLETE.value,
                        turn.tool_call_id,
                        stamp,
                    ),
                    (
                        assistant_id,
                        turn.user,
                        turn.conversation_id,
                        seq + 1,
                        Role.ASSISTANT.value,
                        "",
                        Status.INCOMPLETE.value,
                        "",
                        stamp,
                    ),
                ],
            )
            await db.execute(
                "UPDATE conversations SET next_seq = $1, updated_at = $2, upstream_id = $3"
                " WHERE user_id = $4 AND id = $5",
                seq + 2,
                stamp,
                turn.upstream_id,
                turn.user,
                turn.conversation_id,
            )
        return assistant_id

    @_unavailable_on_outage
    async def finish_turn(
        self, user: str, conversation_id: str, message_id: str, outcome: TurnOutcome
    ) -> None:
        stamp = now()
        async with self.pool.acquire() as db, db.transaction():
            await db.execute(
                "UPDATE messages SET status = $1, text = $2, tool_calls = $3::jsonb,"
                " usage = $4::jsonb, error_reason = $5, updated_at = $6 WHERE id = $7",
                outcome.status.value,
                outcome.text,
                json.dumps(outcome.tool_calls),
                json.dumps(outcome.usage) if outcome.usage else None,
                outcome.error_reason,
                stamp,
                message_id,
            )
            await db.execute(
                "UPDATE conversations SET updated_at = $1,"
                " upstream_id = CASE WHEN $2 = '' THEN upstream_id ELSE $2 END,"
                " title = CASE WHEN $3 = '' THEN title ELSE $3 END WHERE user_id = $4 AND id = $5",
                stamp,
                outcome.upstream_id,
                outcome.title,
                user,
                conversation_id,
            )

    @_unavailable_on_outage
    async def get_conversation(self, user: str, conversation_id: str) -> Conversation | None:
        async with self.pool.acquire() as db:
            row = await db.fetchrow(
                "SELECT id, user_id, upstream, upstream_id, title, created_at, updated_at"
                " FROM conversations WHERE id = $1 AND user_id = $2",
                conversation_id,
                user,
            )
            if row is None:
                return None
            rows = await db.fetch(
                "SELECT id, conversation_id, seq, role, text, status, created_at, updated_at,"
                " tool_calls::text, tool_call_id, usage::text, error_reason FROM messages"
                " WHERE user_id = $1 AND conversation_id = $2 ORDER BY seq",
                user,
                conversation_id,
            )
        return _conversation(row, [_message(m) for m in rows])

    @_unavailable_on_outage
    async def list_conversations(
        self, user: str, page_size: int, page_token: str
    ) -> ConversationPage:
        size = check_page_size(page_size)
        after = decode_page_token(user, page_token)
        sql = (
            "SELECT id, user_id, upstream, upstream_id, title, created_at, updated_at"
            " FROM conversations WHERE user_id = $1"
        )
        args: list[Any] = [user]
        if after is not None:
            sql += " AND (updated_at, id) < ($2, $3)"
            args += [after[0], after[1]]
        sql += f" ORDER BY updated_at DESC, id DESC LIMIT {size + 1}"
        rows = await self.pool.fetch(sql, *args)
        conversations = [_conversation(r, []) for r in rows[:size]]
        token = ""
        if len(rows) > size:
            last = conversations[-1]
            token = encode_page_token(user, last.updated_at, last.id)
        return ConversationPage(conversations, token)

    @_unavailable_on_outage
    async def delete_conversation(self, user: str, conversation_id: str) -> bool:
        result = await self.pool.execute(
            "DELETE FROM conversations WHERE id = $1 AND user_id = $2", conversation_id, user
        )
        return str(result) != "DELETE 0"

    @_unavailable_on_outage
    async def record_session(
        self, session_id: str, user: str, kind: str, expires_at: datetime
    ) -> None:
        await self.pool.execute(
            "INSERT INTO upstream_sessions (id, user_id, kind, expires_at, created_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
            session_id,
            user,
            kind,
            expires_at,
            now(),
        )

    @_unavailable_on_outage
    async def revoke_sessions(self, user: str) -> list[tuple[str, str]]:
        stamp = now()
        rows = await self.pool.fetch(
            "UPDATE upstream_sessions SET revoked_at = $1 WHERE user_id = $2"
            " AND revoked_at IS NULL RETURNING id, kind, expires_at",
            stamp,
            user,
        )
        return [(str(r["id"]), str(r["kind"])) for r in rows if r["expires_at"] > stamp]

    @_unavailable_on_outage
    async def is_revoked(self, session_id: str) -> bool:
        revoked = await self.pool.fetchval(
            "SELECT revoked_at IS NOT NULL FROM upstream_sessions WHERE id = $1", session_id
        )
        return bool(revoked)

    async def listen_revocations(self, listener: RevocationListener) -> None:
        await self._listen(listener)
        self._watchdog = asyncio.create_task(self._keep_listening(listener))

    async def _listen(self, listener: RevocationListener) -> None:
        connection = await asyncpg.connect(
            self._dsn, server_settings={"application_name": LISTENER_APPLICATION_NAME}
        )
        loop = asyncio.get_running_loop()

        def on_notify(_: object, __: int, channel: str, payload: object) -> None:
            del channel
            task = loop.create_task(listener(str(payload)))
            self._notified.add(task)
            task.add_done_callback(self._notified.discard)
            task.add_done_callback(_log_failure)

        await connection.add_listener(REVOCATION_CHANNEL, on_notify)
        self._listener = connection
        self._listening_since = now()

    async def _keep_listening(self, listener: RevocationListener) -> None:
        """Reconnect the LISTEN connection if it drops, and apply what was missed meanwhile
        (sessions revoked since it was last known to be listening)."""
        while True:
            await asyncio.sleep(_LISTEN_CHECK_SECONDS)
            if self._listener is not None and not self._listener.is_closed():
                self._listening_since = now()
                continue
            missed_since = self._listening_since
            try:
                await self._listen(listener)
                users = await self.pool.fetch(
                    "SELECT DISTINCT user_id FROM upstream_sessions WHERE revoked_at >= $1",
                    missed_since - _LISTEN_CHECK_MARGIN,
                )
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("revocation listener reconnect failed", error=type(exc).__name__)
                continue
            log.info("revocation listener reconnected", missed_users=len(users))
            for row in users:
                await listener(str(row["user_id"]))

    @_unavailable_on_outage
    async def announce_revocation(self, user: str) -> None:
        await self.pool.execute("SELECT pg_notify($1, $2)", REVOCATION_CHANNEL, user)


def _log_failure(task: Any) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("revocation listener failed", error=str(task.exception()))


async def _migrate(db: asyncpg.Connection) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TIMESTAMPTZ NOT NULL)"
    )
    applied = {int(r["version"]) for r in await db.fetch("SELECT version FROM schema_migrations")}
    for version, script in MIGRATIONS:
        if version in applied:
            continue
        await db.execute(script)
        await db.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)", version, now()
        )


def _conversation(row: Any, messages: list[Message]) -> Conversation:
    return Conversation(
        id=row["id"],
        user=row["user_id"],
        upstream=row["upstream"],
        upstream_id=row["upstream_id"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        messages=messages,
    )


def _message(row: Any) -> Message:
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        seq=int(row["seq"]),
        role=Role(row["role"]),
        text=row["text"],
        status=Status(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        tool_calls=json.loads(row["tool_calls"] or "[]"),
        tool_call_id=row["tool_call_id"],
        usage=json.loads(row["usage"]) if row["usage"] else None,
        error_reason=row["error_reason"],
    )
