"""Real databases for the tests: SQLite files, schemas on this machine's PostgreSQL, and Redis
servers of a test's own."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
import pytest

from healthagent_service.history.postgres_store import PostgresStore
from healthagent_service.history.sqlite_store import SQLiteStore
from healthagent_service.history.store import ConversationStore

POSTGRES_DSN = os.environ.get(
    "HEALTHAGENT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


async def require_postgres() -> None:
    """Skip when PostgreSQL is not running here; under CI, fail loudly instead."""
    try:
        connection = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL at {POSTGRES_DSN} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    await connection.close()


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A fresh schema, dropped afterwards."""
    await require_postgres()
    schema = f"test_{secrets.token_hex(6)}"
    try:
        yield schema
    finally:
        connection = await asyncpg.connect(POSTGRES_DSN)
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await connection.close()


@asynccontextmanager
async def open_store(backend: str, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    """An opened store of the given backend ("sqlite" or "postgres"), closed afterwards."""
    if backend == "sqlite":
        store: ConversationStore = SQLiteStore(tmp_path / "data" / "healthagent.db")
        await store.open()
        try:
            yield store
        finally:
            await store.close()
        return
    async with postgres_schema() as schema:
        store = PostgresStore(POSTGRES_DSN, schema)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


class ThrowawayRedis:
    """A redis-server of the test's own on a free loopback port, that the test may kill and
    start again (the machine's shared Redis is never touched). With `persist`, every write is
    in an append-only file first, so a restart after `kill -9` finds the data as it was."""

    def __init__(self, directory: Path, *, persist: bool = False) -> None:
        self.directory = directory
        self.persist = persist
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed")
            pytest.skip("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else []
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        arguments += ["--dir", str(self.directory), "--enable-debug-command", "local"]
        self.process = subprocess.Popen(
            [server, *arguments, *persistence],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """Gone at once, as a crash or a lost host would leave it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@contextmanager
def throwaway_redis(directory: Path, *, persist: bool = False) -> Iterator[ThrowawayRedis]:
    redis_server = ThrowawayRedis(directory, persist=persist)
    redis_server.start()
    try:
        yield redis_server
    finally:
        redis_server.kill()
