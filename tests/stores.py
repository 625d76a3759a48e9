"""Real databases for the tests: SQLite files, and schemas on this machine's PostgreSQL."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
