"""The agent server's database: SQLite (a file in the data directory) or PostgreSQL.

The agent server's tables live beside the service's, in the project's own database: one SQLite
file of their own (`agent.db`, so the gRPC service's writer never waits for the agent's), or the
service's PostgreSQL schema, where several agent servers share the threads. The store's SQL is
written once, with `?` placeholders and standard `ON CONFLICT` upserts, which both speak.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from healthagent_service.private_files import private_file

Row = tuple[Any, ...]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS agent_threads (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        seq BIGINT NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS agent_threads_by_user ON agent_threads (user_id, created_at, seq)",
    """CREATE TABLE IF NOT EXISTS agent_items (
        thread_id TEXT NOT NULL,
        id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        seq BIGINT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (thread_id, id)
    )""",
    "CREATE INDEX IF NOT EXISTS agent_items_in_order ON agent_items (thread_id, created_at, seq)",
    """CREATE TABLE IF NOT EXISTS agent_attachments (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        data TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS agent_token_revocations (
        user_id TEXT PRIMARY KEY,
        revoked_before DOUBLE PRECISION NOT NULL
    )""",
]


class AgentDatabase(Protocol):
    """What the agent's store needs: statements with `?` placeholders, run one at a time,
    each atomic on its own."""

    description: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the rows it changed."""
        ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...


class SqliteDatabase:
    """One SQLite file in WAL mode, used from one thread (sqlite3 blocks)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.description = f"SQLite {path}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-sqlite")
        self._connection: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        # conversations are health data: every directory made 0700 and the file 0600, whatever
        # the umask, as the history's file is (mkdir(parents=True) gave only the last 0700)
        private_file(self._path)
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA busy_timeout=30000")
        for statement in SCHEMA:
            connection.execute(statement.replace("DOUBLE PRECISION", "REAL"))
        self._connection = connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(self._connection.close)
            self._connection = None
        self._executor.shutdown(wait=True)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("the agent database is not open")
        return self._connection

    async def execute(self, sql: str, *args: Any) -> int:
        def run() -> int:
            return self._connected().execute(sql, args).rowcount

        result: int = await self._run(run)
        return result

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        def run() -> list[Row]:
            return [tuple(row) for row in self._connected().execute(sql, args).fetchall()]

        rows: list[Row] = await self._run(run)
        return rows


_PLACEHOLDER = re.compile(r"\?")


def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1`, `$2`, ..."""
    counter = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class PostgresDatabase:
    """A connection pool on the project's PostgreSQL schema."""

    def __init__(self, dsn: str, schema: str, pool_size: int) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._statements: dict[str, str] = {}
        self.description = f"PostgreSQL (schema {schema})"

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            server_settings={"search_path": self._schema, "application_name": "healthagent-agent"},
        )
        async with self._pool.acquire() as connection, connection.transaction():
            # two agent servers starting together must not both create the tables
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('healthagent_agent'))")
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
            for statement in SCHEMA:
                await connection.execute(statement)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _sql(self, sql: str) -> str:
        numbered = self._statements.get(sql)
        if numbered is None:
            numbered = self._statements[sql] = _numbered(sql)
        return numbered

    def _connected(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the agent database is not open")
        return self._pool

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._connected().execute(self._sql(sql), *args)
        # "INSERT 0 1", "UPDATE 1", "DELETE 3"
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        records: Sequence[Any] = await self._connected().fetch(self._sql(sql), *args)
        return [tuple(record) for record in records]
