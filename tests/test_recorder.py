"""How a turn is written down, from the events the relay hands its `TurnRecording`: on a real
SQLite store (the same code runs against PostgreSQL in test_store.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from healthagent_service.domain.events import (
    ChatTurn,
    ResponseDone,
    SessionStarted,
    TextDelta,
    TextDone,
)
from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.history.models import Role, Status
from healthagent_service.history.recorder import TurnRecorder
from healthagent_service.history.store import ConversationStore
from tests.support.stores import open_store

TURN = ChatTurn(user="alice", device_id="", message="How did I sleep?")
SESSION = SessionStarted("cksess_1", "thr_1", "alice", "wf_1")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ConversationStore]:
    async with open_store("sqlite", tmp_path) as opened:
        yield opened


async def answer(store: ConversationStore) -> tuple[Role, Status, str, str]:
    conversation = await store.get_conversation("alice", "thr_1")
    assert conversation is not None
    user, assistant = conversation.messages[-2:]
    assert (user.role, user.text) == (Role.USER, "How did I sleep?")
    return assistant.role, assistant.status, assistant.text, assistant.error_reason


async def test_a_complete_turn_keeps_the_final_text(store: ConversationStore) -> None:
    recording = TurnRecorder(store, "chatkit").start(TURN)
    await recording.observe(SESSION)
    assert await answer(store) == (Role.ASSISTANT, Status.INCOMPLETE, "", "")  # while it streams
    recording.add_chunk("Seven ")
    recording.add_chunk("hours.")
    await recording.observe(TextDone("Seven hours.", "msg_1"))
    await recording.observe(ResponseDone("Seven hours.", None, False))
    await recording.finish()
    assert await answer(store) == (Role.ASSISTANT, Status.COMPLETE, "Seven hours.", "")


async def test_a_caller_that_leaves_leaves_what_it_was_sent(store: ConversationStore) -> None:
    recording = TurnRecorder(store, "chatkit").start(TURN)
    await recording.observe(SESSION)
    await recording.observe(TextDelta("Seven ", "msg_1"))  # as the relay's add_chunk does
    await recording.finish()  # no ResponseDone, no upstream error: the caller went away
    assert await answer(store) == (Role.ASSISTANT, Status.INCOMPLETE, "Seven ", "CANCELLED")


async def test_an_upstream_error_is_recorded_with_its_reason(store: ConversationStore) -> None:
    recording = TurnRecorder(store, "chatkit").start(TURN)
    await recording.observe(SESSION)
    recording.add_chunk("Seven ")
    await recording.upstream_failed(
        HealthAgentError(ErrorKind.UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", "cut")
    )
    await recording.finish()
    assert await answer(store) == (
        Role.ASSISTANT,
        Status.INCOMPLETE,
        "Seven ",
        "UPSTREAM_STREAM_TRUNCATED",
    )


async def test_an_unexpected_upstream_failure_is_internal(store: ConversationStore) -> None:
    recording = TurnRecorder(store, "chatkit").start(TURN)
    await recording.observe(SESSION)
    await recording.upstream_failed(ValueError("a bug"))
    await recording.finish()
    assert await answer(store) == (Role.ASSISTANT, Status.INCOMPLETE, "", "INTERNAL")


async def test_a_refused_turn_on_a_known_conversation_is_recorded(
    store: ConversationStore,
) -> None:
    first = TurnRecorder(store, "chatkit").start(TURN)
    await first.observe(SESSION)
    await first.observe(ResponseDone("", None, False))
    await first.finish()
    refused = TurnRecorder(store, "chatkit").start(
        ChatTurn(user="alice", device_id="", message="How did I sleep?", conversation_id="thr_1")
    )
    await refused.upstream_failed(
        HealthAgentError(ErrorKind.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", "429")
    )
    await refused.finish()
    assert await answer(store) == (Role.ASSISTANT, Status.FAILED, "", "UPSTREAM_RATE_LIMITED")


async def test_a_turn_that_never_began_writes_nothing(store: ConversationStore) -> None:
    recording = TurnRecorder(store, "chatkit").start(TURN)  # a new conversation, no session yet
    await recording.upstream_failed(
        HealthAgentError(ErrorKind.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", "down")
    )
    await recording.finish()
    assert await store.get_conversation("alice", "thr_1") is None
