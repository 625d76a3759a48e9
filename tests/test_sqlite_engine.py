"""The SQLite write engine alone, on a real file: where each write runs, grouping, ordering,
errors, checkpoints and closing. (The store's SQL on top of it is tests/test_store.py's.)"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from healthagent_service.history.sqlite_engine import CHECKPOINT_EVERY_COMMITS, SQLiteEngine
from tests.support.sqlite import loop_ticks, write_lock_held


def _create_table(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE)")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[SQLiteEngine]:
    opened = SQLiteEngine(tmp_path / "data" / "engine.db")
    await opened.open()
    await opened.write(_create_table)
    opened.open_loop_connection()
    try:
        yield opened
    finally:
        await opened.close()


def names(path: Path) -> list[str]:
    """What another connection reads: committed rows only, in the order they went in."""
    db = sqlite3.connect(path)
    try:
        return [str(r[0]) for r in db.execute("SELECT name FROM items ORDER BY seq")]
    finally:
        db.close()


def half_then_fail(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO items (name) VALUES ('half')")
    raise ValueError("refused")


class Recorder:
    """Writes that note the thread each ran on."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}

    def insert(self, name: str) -> Callable[[sqlite3.Connection], str]:
        def work(db: sqlite3.Connection) -> str:
            self.threads[name] = threading.current_thread().name
            db.execute("INSERT INTO items (name) VALUES (?)", (name,))
            return name

        return work


async def test_a_small_write_commits_on_the_loop_before_its_caller_resumes(
    engine: SQLiteEngine,
) -> None:
    recorder = Recorder()
    commits = engine.commits
    assert await engine.write(recorder.insert("a"), small=True) == "a"
    assert recorder.threads["a"] == threading.current_thread().name
    assert names(engine.path) == ["a"]
    assert engine.commits == commits + 1


async def test_other_writes_and_reads_run_on_the_worker(engine: SQLiteEngine) -> None:
    recorder = Recorder()
    assert await engine.write(recorder.insert("a")) == "a"
    assert recorder.threads["a"].startswith("sqlite")
    assert names(engine.path) == ["a"]

    def read(db: sqlite3.Connection) -> tuple[str, int]:
        return threading.current_thread().name, int(
            db.execute("SELECT count(*) FROM items").fetchone()[0]
        )

    thread, count = await engine.read(read)
    assert thread.startswith("sqlite")
    assert count == 1


async def test_before_the_loop_connection_opens_small_writes_go_to_the_worker(
    tmp_path: Path,
) -> None:
    engine = SQLiteEngine(tmp_path / "engine.db")
    await engine.open()
    try:
        await engine.write(_create_table, small=True)
        recorder = Recorder()
        await engine.write(recorder.insert("a"), small=True)
        assert recorder.threads["a"].startswith("sqlite")
    finally:
        await engine.close()


async def test_a_small_write_waits_on_the_worker_while_another_connection_writes(
    engine: SQLiteEngine,
) -> None:
    recorder = Recorder()
    async with loop_ticks() as ticks:
        with write_lock_held(engine.path) as other:
            written = asyncio.create_task(engine.write(recorder.insert("a"), small=True))
            await asyncio.sleep(0.3)
            assert not written.done()  # waiting for the lock, in the worker
            assert ticks.count >= 10  # and the loop ran meanwhile
            assert names(engine.path) == []
            other.execute("COMMIT")
            assert await asyncio.wait_for(written, 10) == "a"
    assert recorder.threads["a"].startswith("sqlite")
    assert names(engine.path) == ["a"]


@pytest.mark.parametrize("small", [False, True], ids=["worker", "loop"])
async def test_a_failing_write_raises_unchanged_with_nothing_of_it_written(
    engine: SQLiteEngine, small: bool
) -> None:
    commits = engine.commits
    with pytest.raises(ValueError, match="refused"):
        await engine.write(half_then_fail, small=small)
    assert engine.commits == commits
    assert names(engine.path) == []
    # the connection is left outside any transaction: the next write goes through
    await engine.write(Recorder().insert("after"), small=small)
    assert names(engine.path) == ["after"]
    assert engine.commits == commits + 1


async def test_writes_queued_together_commit_in_one_transaction_in_their_order(
    engine: SQLiteEngine,
) -> None:
    recorder = Recorder()
    commits = engine.commits
    expected = [f"w{i}" for i in range(20)]
    with write_lock_held(engine.path) as other:
        first = asyncio.create_task(engine.write(recorder.insert("first")))
        await asyncio.sleep(0.2)  # the worker now waits for the lock, holding "first"
        writes = asyncio.gather(
            *(
                engine.write(recorder.insert(name), small=i % 2 == 0)
                for i, name in enumerate(expected)
            )
        )
        await asyncio.sleep(0.1)
        other.execute("COMMIT")
        assert await first == "first"
        assert await writes == expected
    assert names(engine.path) == ["first", *expected]
    assert {recorder.threads[name][:6] for name in expected} == {"sqlite"}
    assert engine.commits == commits + 2  # "first" alone, then the twenty queued behind it


async def test_a_failing_write_in_a_group_is_undone_alone(engine: SQLiteEngine) -> None:
    recorder = Recorder()
    commits = engine.commits
    with write_lock_held(engine.path) as other:
        first = asyncio.create_task(engine.write(recorder.insert("first")))
        await asyncio.sleep(0.2)  # the worker now waits for the lock, holding "first"
        writes = asyncio.gather(
            engine.write(recorder.insert("a")),
            engine.write(half_then_fail),
            engine.write(recorder.insert("a")),  # the UNIQUE name: refused by SQLite itself
            engine.write(recorder.insert("b")),
            return_exceptions=True,
        )
        await asyncio.sleep(0.1)
        other.execute("COMMIT")
        await first
        results = await writes
    assert results[0] == "a"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert results[3] == "b"
    assert names(engine.path) == ["first", "a", "b"]
    assert engine.commits == commits + 2


async def test_a_caller_that_leaves_does_not_undo_its_write(engine: SQLiteEngine) -> None:
    recorder = Recorder()
    with write_lock_held(engine.path) as other:
        first = asyncio.create_task(engine.write(recorder.insert("first")))
        await asyncio.sleep(0.2)  # the worker now waits for the lock, holding "first"
        writes = [asyncio.create_task(engine.write(recorder.insert(n))) for n in "abc"]
        await asyncio.sleep(0.1)
        writes[1].cancel()
        other.execute("COMMIT")
        await first
    assert await writes[0] == "a"
    assert await writes[2] == "c"  # settled though "b" before it in its group was not
    with pytest.raises(asyncio.CancelledError):
        await writes[1]
    assert names(engine.path) == ["first", "a", "b", "c"]


async def test_close_waits_for_the_writes_handed_to_the_worker(tmp_path: Path) -> None:
    engine = SQLiteEngine(tmp_path / "engine.db")
    await engine.open()
    await engine.write(_create_table)
    engine.open_loop_connection()
    with write_lock_held(engine.path) as other:
        writes = [asyncio.create_task(engine.write(Recorder().insert(f"w{i}"))) for i in range(5)]
        await asyncio.sleep(0.1)
        closing = asyncio.create_task(engine.close())
        await asyncio.sleep(0.1)
        assert not closing.done()
        other.execute("COMMIT")
        await asyncio.wait_for(closing, 10)
    assert all(w.done() for w in writes)  # settled before close returned
    assert [w.result() for w in writes] == [f"w{i}" for i in range(5)]
    assert names(engine.path) == [f"w{i}" for i in range(5)]


async def test_loop_commits_have_the_worker_start_the_wal_over(engine: SQLiteEngine) -> None:
    """The loop's connection never checkpoints: without the worker's, the WAL would hold every
    commit (here about 2.5 MB)."""
    wal = engine.path.with_name(engine.path.name + "-wal")
    sizes = []
    for i in range(6 * CHECKPOINT_EVERY_COMMITS):
        await engine.write(Recorder().insert(f"w{i}" + "x" * 2000), small=True)
        if i % CHECKPOINT_EVERY_COMMITS == CHECKPOINT_EVERY_COMMITS - 1:
            await engine.read(lambda db: None)  # the checkpoint queued before it has run
            sizes.append(wal.stat().st_size)
    assert sizes[0] > 100 * 2000
    assert max(sizes) < 2 * sizes[0]  # each hundred commits wrote over the last
