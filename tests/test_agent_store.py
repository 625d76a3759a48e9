"""The agent server's ChatKit Store on real SQLite and PostgreSQL: scoping, ids, upserts, pages;
and two agent servers on one PostgreSQL serving one conversation in turn."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from chatkit.store import NotFoundError
from chatkit.types import AssistantMessageContent, AssistantMessageItem, ThreadMetadata

from healthagent_service.agent.database import PostgresDatabase, SqliteDatabase
from healthagent_service.agent.thread_store import RequestContext, ThreadStore
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.agents import (
    SERVICE_AUTH,
    AgentFactory,
    chatkit_request,
    post_chatkit,
    user_input,
    user_messages,
)
from tests.support.stores import POSTGRES_DSN, postgres_schema

ALICE = RequestContext("alice", "service")
MALLORY = RequestContext("mallory", "service")
START = datetime(2026, 12, 1, 9, 0, 0)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ThreadStore]:
    if request.param == "sqlite":
        database = SqliteDatabase(tmp_path / "data" / "agent.db")
        await database.open()
        yield ThreadStore(database)
        await database.close()
        return
    async with postgres_schema() as schema:
        database_pg = PostgresDatabase(POSTGRES_DSN, schema, 2)
        await database_pg.open()
        yield ThreadStore(database_pg)
        await database_pg.close()


def _thread(store: ThreadStore, minutes: int = 0) -> ThreadMetadata:
    return ThreadMetadata(
        id=store.generate_thread_id(ALICE), created_at=START + timedelta(minutes=minutes)
    )


def _message(
    store: ThreadStore, thread: ThreadMetadata, text: str, seconds: int
) -> AssistantMessageItem:
    return AssistantMessageItem(
        id=store.generate_item_id("message", thread, ALICE),
        thread_id=thread.id,
        created_at=START + timedelta(seconds=seconds),
        content=[AssistantMessageContent(text=text, annotations=[])],
    )


async def test_ids_are_full_length_and_random(store: ThreadStore) -> None:
    thread = _thread(store)
    ids = {store.generate_item_id("message", thread, ALICE) for _ in range(100)}
    assert len(ids) == 100
    assert all(item_id.startswith("msg_") and len(item_id) == 4 + 32 for item_id in ids)
    assert len(thread.id) == 4 + 32


async def test_another_users_records_are_not_found(store: ThreadStore) -> None:
    thread = _thread(store)
    await store.save_thread(thread, ALICE)
    item = _message(store, thread, "private", 1)
    await store.add_thread_item(thread.id, item, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_thread(thread.id, MALLORY)
    with pytest.raises(NotFoundError):
        await store.load_thread_items(thread.id, None, 10, "asc", MALLORY)
    with pytest.raises(NotFoundError):
        await store.load_item(thread.id, item.id, MALLORY)
    with pytest.raises(NotFoundError):
        await store.add_thread_item(thread.id, _message(store, thread, "forged", 2), MALLORY)
    with pytest.raises(NotFoundError):  # taking over the id is refused, not an overwrite
        await store.save_thread(thread.model_copy(update={"title": "mine now"}), MALLORY)
    with pytest.raises(NotFoundError):
        await store.delete_thread(thread.id, MALLORY)
    await store.delete_thread_item(thread.id, item.id, MALLORY)  # a no-op for a stranger
    assert (await store.load_threads(10, None, "asc", MALLORY)).data == []
    kept = await store.load_thread_items(thread.id, None, 10, "asc", ALICE)
    assert [i.id for i in kept.data] == [item.id]
    assert (await store.load_thread(thread.id, ALICE)).title is None


async def test_save_item_is_an_upsert_that_keeps_the_items_place(store: ThreadStore) -> None:
    thread = _thread(store)
    await store.save_thread(thread, ALICE)
    first, second = _message(store, thread, "one", 1), _message(store, thread, "two", 2)
    await store.add_thread_item(thread.id, first, ALICE)
    await store.add_thread_item(thread.id, second, ALICE)
    first.content[0].text = "one, edited"
    await store.save_item(thread.id, first, ALICE)
    page = await store.load_thread_items(thread.id, None, 10, "asc", ALICE)
    assert [
        (i.id, i.content[0].text) for i in page.data if isinstance(i, AssistantMessageItem)
    ] == [
        (first.id, "one, edited"),
        (second.id, "two"),
    ]


async def test_pages_follow_the_sdks_cursor_rules(store: ThreadStore) -> None:
    thread = _thread(store)
    await store.save_thread(thread, ALICE)
    items = [_message(store, thread, f"m{n}", n) for n in range(5)]
    for item in reversed(items):  # stored out of order: pages follow created_at
        await store.add_thread_item(thread.id, item, ALICE)
    ids = [item.id for item in items]
    page = await store.load_thread_items(thread.id, None, 2, "asc", ALICE)
    assert [i.id for i in page.data] == ids[:2] and page.has_more and page.after == ids[1]
    page = await store.load_thread_items(thread.id, page.after, 2, "asc", ALICE)
    assert [i.id for i in page.data] == ids[2:4] and page.after == ids[3]
    page = await store.load_thread_items(thread.id, page.after, 2, "asc", ALICE)
    assert [i.id for i in page.data] == ids[4:] and not page.has_more and page.after is None
    page = await store.load_thread_items(thread.id, None, 3, "desc", ALICE)
    assert [i.id for i in page.data] == ids[::-1][:3] and page.after == ids[2]
    page = await store.load_thread_items(thread.id, page.after, 3, "desc", ALICE)
    assert [i.id for i in page.data] == ids[1::-1] and not page.has_more
    threads = [_thread(store, minutes) for minutes in (3, 1, 2)]
    for other in threads:
        await store.save_thread(other, ALICE)
    listed = await store.load_threads(10, None, "desc", ALICE)
    assert [t.id for t in listed.data][:3] == [threads[0].id, threads[2].id, threads[1].id]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
async def test_sqlite_threads_are_private_to_the_servers_user(tmp_path: Path, umask: int) -> None:
    """Every directory the agent's database creates is 0700 and its files 0600 (the database,
    and its WAL and shared-memory files, which SQLite makes with the database's mode), whatever
    the umask (before: only the last directory was 0700, the others 0755 under umask 022)."""
    path = tmp_path / "fresh" / "nested" / "agent.db"
    previous = os.umask(umask)
    try:
        database = SqliteDatabase(path)
        await database.open()
        try:
            # while open: SQLite removes the WAL files when the last connection closes
            wal_files = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm")]
            wal_modes = {name: stat.S_IMODE(name.stat().st_mode) for name in wal_files}
        finally:
            await database.close()
    finally:
        os.umask(previous)
    modes = {
        name: stat.S_IMODE(name.stat().st_mode) for name in (path.parent.parent, path.parent, path)
    }
    assert modes == {path.parent.parent: 0o700, path.parent: 0o700, path: 0o600}
    assert wal_modes == dict.fromkeys(wal_files, 0o600)


async def test_two_agent_servers_on_one_postgresql_serve_one_conversation_in_turn(
    emulator: ChatKitEmulator, start_agent: AgentFactory
) -> None:
    async with postgres_schema() as schema:
        shared = {"HEALTHAGENT_DATABASE_URL": POSTGRES_DSN, "HEALTHAGENT_DATABASE_SCHEMA": schema}
        first, second = await start_agent(**shared), await start_agent(**shared)
        headers = {SERVICE_AUTH[0]: SERVICE_AUTH[1], "X-HealthAgent-User": "alice"}
        status, events = await post_chatkit(
            first, chatkit_request("threads.create", input=user_input("turn one")), headers
        )
        assert status == 200
        thread_id = events[0]["thread"]["id"]
        status, events = await post_chatkit(
            second,
            chatkit_request(
                "threads.add_user_message", thread_id=thread_id, input=user_input("turn two")
            ),
            headers,
        )
        assert status == 200 and events[-1]["type"] == "client_effect"
        assert user_messages(emulator.model_requests[-1]) == ["turn one", "turn two"]
        status, events = await post_chatkit(
            first,
            chatkit_request(
                "threads.add_user_message", thread_id=thread_id, input=user_input("turn three")
            ),
            headers,
        )
        assert user_messages(emulator.model_requests[-1]) == ["turn one", "turn two", "turn three"]
        await first.stop()
        await second.stop()


def _add_message(thread_id: str, text: str) -> bytes:
    return chatkit_request("threads.add_user_message", thread_id=thread_id, input=user_input(text))
