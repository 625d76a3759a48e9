"""Picks the store from the settings: PostgreSQL when a database URL is set, else SQLite."""

from __future__ import annotations

import sqlite3

import asyncpg

from healthagent_service.config import Settings
from healthagent_service.history.postgres_store import PostgresStore
from healthagent_service.history.sqlite_store import SQLiteStore
from healthagent_service.history.store import ConversationStore

SQLITE_FILE = "healthagent.db"
# how soon a worker stops handing out a session another worker revoked (SQLite has no NOTIFY)
REVOCATION_POLL_SECONDS = 0.25


# What opening a store raises when the database cannot be reached, refuses the connection, or
# its file cannot be opened or written: what an operator fixes in the settings or around them.
# (A corrupt SQLite file is a crash, not this.)
OPEN_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    sqlite3.OperationalError,
)


def store_from_settings(settings: Settings) -> ConversationStore:
    """The configured store, not yet opened."""
    if settings.database.url is not None:
        return PostgresStore(
            settings.database.url.get_secret_value(),
            settings.database.schema_name,
            settings.database.pool_size,
        )
    # workers share the file; each must hear of the others' revocations (PostgreSQL: NOTIFY)
    poll = REVOCATION_POLL_SECONDS if settings.server.workers > 1 else None
    return SQLiteStore(settings.database.data_dir / SQLITE_FILE, revocation_poll_seconds=poll)


def describe_store(settings: Settings) -> str:
    """Where history goes, for the start-up log (never the URL: it may hold a password)."""
    if settings.database.url is not None:
        return f"PostgreSQL (schema {settings.database.schema_name})"
    return f"SQLite at {settings.database.data_dir / SQLITE_FILE}"
