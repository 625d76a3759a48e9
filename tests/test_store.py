"""Both store backends pass the same tests, on real databases."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from healthagent_service.errors import HealthAgentError
from healthagent_service.history.models import NewTurn, Role, Status, TurnOutcome
from healthagent_service.history.sqlite_store import SQLiteStore
from healthagent_service.history.store import ConversationStore
from tests.support.sqlite import loop_ticks, write_lock_held
from tests.support.stores import open_store


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    async with open_store(request.param, tmp_path) as opened:
        yield opened


def user_turn(conversation: str, text: str, user: str = "alice") -> NewTurn:
    return NewTurn(
        conversation_id=conversation,
        user=user,
        upstream="chatkit",
        upstream_id="cksess_1",
        role=Role.USER,
        text=text,
    )


async def test_migrations_are_versioned_and_idempotent(store: ConversationStore) -> None:
    assert await store.schema_version() == 2
    await store.open()  # again: nothing to apply, nothing breaks
    assert await store.schema_version() == 2


async def test_a_turn_is_recorded_in_order(store: ConversationStore) -> None:
    reply = await store.begin_turn(user_turn("thr_1", "How did I sleep?"))
    pending = await store.get_conversation("alice", "thr_1")
    assert pending is not None
    assert [(m.role, m.status, m.text) for m in pending.messages] == [
        (Role.USER, Status.COMPLETE, "How did I sleep?"),
        (Role.ASSISTANT, Status.INCOMPLETE, ""),
    ]
    await store.finish_turn(
        "alice",
        "thr_1",
        reply,
        TurnOutcome(
            Status.COMPLETE,
            "Seven hours.",
            usage={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        ),
    )
    tool = await store.begin_turn(
        NewTurn(
            "thr_1",
            "alice",
            "chatkit",
            "cksess_1",
            Role.TOOL,
            '{"steps": 1}',
            tool_call_id="call_1",
        )
    )
    await store.finish_turn(
        "alice",
        "thr_1",
        tool,
        TurnOutcome(
            Status.INCOMPLETE,
            "Part",
            tool_calls=[{"call_id": "c2", "name": "n", "arguments": "{}"}],
            error_reason="UPSTREAM_STREAM_TRUNCATED",
        ),
    )
    done = await store.get_conversation("alice", "thr_1")
    assert done is not None
    assert [m.seq for m in done.messages] == [0, 1, 2, 3]
    assert done.messages[1].text == "Seven hours." and done.messages[1].usage == {
        "input_tokens": 3,
        "output_tokens": 2,
        "total_tokens": 5,
    }
    assert done.messages[2].role is Role.TOOL and done.messages[2].tool_call_id == "call_1"
    assert done.messages[3].status is Status.INCOMPLETE
    assert done.messages[3].tool_calls[0]["call_id"] == "c2"
    assert done.messages[3].error_reason == "UPSTREAM_STREAM_TRUNCATED"


async def test_users_only_see_their_own(store: ConversationStore) -> None:
    await store.begin_turn(user_turn("thr_a", "mine"))
    assert await store.get_conversation("mallory", "thr_a") is None
    assert (await store.list_conversations("mallory", 0, "")).conversations == []
    assert not await store.delete_conversation("mallory", "thr_a")
    # Thread ids are only unique per user: the same id for someone else is their own thread.
    await store.begin_turn(user_turn("thr_a", "also mine", user="mallory"))
    theirs = await store.get_conversation("mallory", "thr_a")
    mine = await store.get_conversation("alice", "thr_a")
    assert theirs is not None and [m.text for m in theirs.messages] == ["also mine", ""]
    assert mine is not None and [m.text for m in mine.messages] == ["mine", ""]
    assert await store.has_conversation("alice", "thr_a")
    assert not await store.has_conversation("nobody", "thr_a")
    assert await store.delete_conversation("alice", "thr_a")
    assert await store.get_conversation("alice", "thr_a") is None


async def test_listing_pages_newest_first(store: ConversationStore) -> None:
    for index in range(5):
        await store.begin_turn(user_turn(f"thr_{index}", f"m{index}"))
        await asyncio.sleep(0.002)
    first = await store.list_conversations("alice", 2, "")
    assert [c.id for c in first.conversations] == ["thr_4", "thr_3"] and first.next_page_token
    second = await store.list_conversations("alice", 2, first.next_page_token)
    assert [c.id for c in second.conversations] == ["thr_2", "thr_1"]
    last = await store.list_conversations("alice", 2, second.next_page_token)
    assert [c.id for c in last.conversations] == ["thr_0"] and last.next_page_token == ""
    with pytest.raises(HealthAgentError) as bad:
        await store.list_conversations("mallory", 2, first.next_page_token)
    assert bad.value.field_violations[0].field == "page_token"
    with pytest.raises(HealthAgentError):
        await store.list_conversations("alice", -1, "")
    with pytest.raises(HealthAgentError):
        await store.list_conversations("alice", 2, "garbage!")


async def test_concurrent_turns_never_share_a_number(store: ConversationStore) -> None:
    await store.begin_turn(user_turn("thr_c", "first"))
    await asyncio.gather(*(store.begin_turn(user_turn("thr_c", f"m{i}")) for i in range(10)))
    conversation = await store.get_conversation("alice", "thr_c")
    assert conversation is not None
    assert [m.seq for m in conversation.messages] == list(range(22))


async def test_sessions_are_revoked(store: ConversationStore) -> None:
    later = datetime.now(UTC) + timedelta(minutes=10)
    await store.record_session("cksess_1", "alice", "chatkit", later)
    await store.record_session("cksess_2", "alice", "chatkit", later)
    await store.record_session(
        "cksess_old", "alice", "chatkit", datetime.now(UTC) - timedelta(minutes=1)
    )
    await store.record_session("cksess_3", "bob", "chatkit", later)
    revoked = await store.revoke_sessions("alice")
    assert sorted(revoked) == [("cksess_1", "chatkit"), ("cksess_2", "chatkit")]
    assert await store.is_revoked("cksess_1") and not await store.is_revoked("cksess_3")
    assert await store.revoke_sessions("alice") == []


async def test_revocations_missed_while_the_listener_was_down_are_applied(
    tmp_path: Path,
) -> None:
    import asyncpg

    from healthagent_service.history.postgres_store import LISTENER_APPLICATION_NAME
    from tests.support.stores import POSTGRES_DSN

    async with open_store("postgres", tmp_path) as first:
        heard: list[str] = []

        async def listener(user: str) -> None:
            heard.append(user)

        await first.listen_revocations(listener)
        await first.record_session(
            "cksess_9", "nina", "chatkit", datetime.now(UTC) + timedelta(minutes=5)
        )
        admin = await asyncpg.connect(POSTGRES_DSN)
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            LISTENER_APPLICATION_NAME,
        )
        await admin.close()
        await first.revoke_sessions("nina")  # its NOTIFY is lost: nobody is listening
        await first.announce_revocation("nina")
        for _ in range(100):
            if "nina" in heard:
                break
            await asyncio.sleep(0.05)
        assert "nina" in heard  # the watchdog reconnected and caught up from the table


def _half_a_turn_then_a_failure(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO conversations (id, user_id, upstream, upstream_id, created_at,"
        " updated_at) VALUES ('thr_bad', 'alice', 'chatkit', 'x', 'now', 'now')"
    )
    raise sqlite3.IntegrityError("refused")


@pytest.mark.parametrize("small", [False, True], ids=["worker", "loop"])
async def test_sqlite_write_alone_in_its_transaction_is_undone_when_it_fails(
    tmp_path: Path, small: bool
) -> None:
    async with open_store("sqlite", tmp_path) as store:
        assert isinstance(store, SQLiteStore)
        commits = store.commits
        with pytest.raises(sqlite3.IntegrityError):
            await store._write(_half_a_turn_then_a_failure, small=small)
        assert store.commits == commits
        assert await store.get_conversation("alice", "thr_bad") is None
        # the connection is left outside any transaction: the next write goes through
        assert await store.begin_turn(user_turn("thr_next", "after")) is not None
        assert await store.get_conversation("alice", "thr_next") is not None
        assert store.commits == commits + 1


async def test_sqlite_turn_writes_wait_off_the_loop_while_another_connection_writes(
    tmp_path: Path,
) -> None:
    async with open_store("sqlite", tmp_path) as store:
        assert isinstance(store, SQLiteStore)
        async with loop_ticks() as ticks:
            with write_lock_held(store._path) as other:
                begun = asyncio.create_task(store.begin_turn(user_turn("thr_1", "m")))
                await asyncio.sleep(0.3)
                assert not begun.done()  # waiting for the lock, in the worker
                assert ticks.count >= 10  # and the loop ran meanwhile
                other.execute("COMMIT")
                message_id = await asyncio.wait_for(begun, 10)
        conversation = await store.get_conversation("alice", "thr_1")
        assert conversation is not None
        assert [m.id for m in conversation.messages][-1] == message_id


async def test_sqlite_checkpoints_keep_the_wal_small(tmp_path: Path) -> None:
    async with open_store("sqlite", tmp_path) as store:
        assert isinstance(store, SQLiteStore)
        for i in range(600):  # 1,200 commits on the loop, about 5,000 pages
            message_id = await store.begin_turn(user_turn(f"thr_{i % 20}", f"m{i}"))
            await store.finish_turn(
                "alice", f"thr_{i % 20}", message_id, TurnOutcome(Status.COMPLETE, "a" * 500)
            )
            if i % 100 == 0:
                await asyncio.sleep(0.01)  # the worker's checkpoint takes its turn
        wal = store._path.with_name(store._path.name + "-wal")
        assert wal.stat().st_size < 8 * 2**20


async def test_sqlite_group_commit_undoes_a_failing_write_alone(tmp_path: Path) -> None:
    async with open_store("sqlite", tmp_path) as store:
        assert isinstance(store, SQLiteStore)

        turns = [store.begin_turn(user_turn(f"thr_{i}", f"m{i}")) for i in range(20)]
        # while another connection writes, every write queues for the worker
        with write_lock_held(store._path) as other:
            writes = asyncio.gather(
                *turns[:10],
                store._write(_half_a_turn_then_a_failure),
                *turns[10:],
                return_exceptions=True,
            )
            await asyncio.sleep(0.2)
            other.execute("COMMIT")
            results = await writes
        assert isinstance(results[10], sqlite3.IntegrityError)
        assert all(isinstance(r, str) for r in results[:10] + results[11:])
        assert await store.get_conversation("alice", "thr_bad") is None
        page = await store.list_conversations("alice", 100, "")
        assert len(page.conversations) == 20
        for i in range(20):
            conversation = await store.get_conversation("alice", f"thr_{i}")
            assert conversation is not None
            assert [m.text for m in conversation.messages] == [f"m{i}", ""]
        # the writes queued together went in fewer transactions than writes
        assert store.commits < 21


async def test_sqlite_processes_sharing_a_file_hear_each_others_revocations(
    tmp_path: Path,
) -> None:
    """`serve --workers`: each worker has its own store on the one file and polls it. A stamp
    left by a clock that ran ahead must not hide the revocations after it."""
    path = tmp_path / "shared.db"
    revoker = SQLiteStore(path, revocation_poll_seconds=0.05)
    listener = SQLiteStore(path, revocation_poll_seconds=0.05)
    await revoker.open()
    await listener.open()
    later = datetime.now(UTC) + timedelta(minutes=10)
    try:
        for session, user in (("cks_ahead", "zed"), ("cks_a", "ann"), ("cks_b", "bob")):
            await revoker.record_session(session, user, "chatkit", later)
        # zed was revoked by a process whose clock was an hour ahead
        ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        db = sqlite3.connect(path)
        with db:
            db.execute(
                "UPDATE upstream_sessions SET revoked_at = ? WHERE id = ?", [ahead, "cks_ahead"]
            )
        db.close()
        heard: list[str] = []

        async def hear(user: str) -> None:
            heard.append(user)

        await listener.listen_revocations(hear)  # from the newest stamp on: zed's is old news
        await revoker.revoke_sessions("ann")
        await revoker.revoke_sessions("bob")
        for _ in range(100):
            if len(heard) >= 2:
                break
            await asyncio.sleep(0.02)
        assert heard == ["ann", "bob"]
    finally:
        await listener.close()
        await revoker.close()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
async def test_sqlite_history_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """The data directory is 0700 and the database files 0600 (issue 23, item 9): the history
    holds health conversations, and another local user must not read them."""
    path = tmp_path / "fresh" / "nested" / "healthagent.db"
    previous = os.umask(umask)
    try:
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.begin_turn(user_turn("thr_private", "mine"))
            modes = {
                name: stat.S_IMODE(os.stat(name).st_mode)
                for name in (
                    path.parent.parent,
                    path.parent,
                    path,
                    Path(f"{path}-wal"),
                    Path(f"{path}-shm"),
                )
            }
        finally:
            await store.close()
    finally:
        os.umask(previous)
    assert modes == {
        path.parent.parent: 0o700,
        path.parent: 0o700,
        path: 0o600,
        Path(f"{path}-wal"): 0o600,
        Path(f"{path}-shm"): 0o600,
    }
