"""Conversation history end to end, on SQLite and on this machine's PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect, status_details
from tests.support.service import TEST_API_KEY, ServiceFactory, emulator_env
from tests.support.stores import POSTGRES_DSN, postgres_schema


@pytest.fixture(params=["sqlite", "postgres"])
async def history_env(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings for one backend: SQLite in the test's directory, or a fresh Postgres schema."""
    if request.param == "sqlite":
        yield {}
        return
    async with postgres_schema() as schema:
        yield {"HEALTHAGENT_DATABASE_URL": POSTGRES_DSN, "HEALTHAGENT_DATABASE_SCHEMA": schema}


async def get(stub: pb_grpc.HealthAgentStub, user: str, conversation_id: str) -> pb.Conversation:
    answer: pb.GetConversationResponse = await stub.GetConversation(
        pb.GetConversationRequest(user=user, conversation_id=conversation_id)
    )
    return answer.conversation


def summary(conversation: pb.Conversation) -> list[tuple[str, str]]:
    return [
        (pb.MessageRole.Name(m.role), pb.MessageStatus.Name(m.status))
        for m in conversation.messages
    ]


async def test_turns_are_recorded_and_read_back(
    emulator: ChatKitEmulator, start_service: ServiceFactory, history_env: dict[str, Any]
) -> None:
    service = await start_service(**emulator_env(emulator, **history_env))
    stub = service.stub
    first = await collect(stub.Chat(pb.ChatRequest(message="How did I sleep?", user="alice")))
    conversation_id = first[0].session.conversation_id
    tool = await collect(
        stub.Chat(
            pb.ChatRequest(message="steps [tool]", user="alice", conversation_id=conversation_id)
        )
    )
    call = next(e.tool_call for e in tool if e.WhichOneof("event") == "tool_call")
    await collect(
        stub.Chat(
            pb.ChatRequest(
                user="alice",
                conversation_id=conversation_id,
                tool_output=pb.ToolOutput(call_id=call.call_id, output_json='{"steps": 5}'),
            )
        )
    )
    conversation = await get(stub, "alice", conversation_id)
    assert conversation.user == "alice" and conversation.upstream == "chatkit"
    assert summary(conversation) == [
        ("MESSAGE_ROLE_USER", "MESSAGE_STATUS_COMPLETE"),
        ("MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_COMPLETE"),
    ] * 2 + [
        ("MESSAGE_ROLE_TOOL", "MESSAGE_STATUS_COMPLETE"),
        ("MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_COMPLETE"),
    ]
    messages = conversation.messages
    assert messages[0].text == "How did I sleep?"
    assert messages[1].text == first[-1].response_done.text
    assert messages[3].tool_calls[0].call_id == call.call_id
    assert messages[4].tool_call_id == call.call_id and messages[4].text == '{"steps": 5}'
    assert messages[5].text == 'Thanks. The tool returned {"steps": 5}.'


async def test_listing_exporting_deleting_and_isolation(
    emulator: ChatKitEmulator, start_service: ServiceFactory, history_env: dict[str, Any]
) -> None:
    service = await start_service(**emulator_env(emulator, **history_env))
    stub = service.stub
    ids = []
    for index in range(3):
        events = await collect(stub.Chat(pb.ChatRequest(message=f"m{index}", user="bob")))
        ids.append(events[0].session.conversation_id)
    page = await stub.ListConversations(pb.ListConversationsRequest(user="bob", page_size=2))
    assert [c.id for c in page.conversations] == [ids[2], ids[1]] and page.next_page_token
    rest = await stub.ListConversations(
        pb.ListConversationsRequest(user="bob", page_size=2, page_token=page.next_page_token)
    )
    assert [c.id for c in rest.conversations] == [ids[0]] and not rest.next_page_token
    assert not page.conversations[0].messages  # listing leaves messages out
    exported = await stub.ExportConversation(
        pb.ExportConversationRequest(user="bob", conversation_id=ids[0])
    )
    document = json.loads(exported.content)
    assert exported.content_type == "application/json" and document["id"] == ids[0]
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"]
    markdown = await stub.ExportConversation(
        pb.ExportConversationRequest(
            user="bob", conversation_id=ids[0], format=pb.EXPORT_FORMAT_MARKDOWN
        )
    )
    assert markdown.content.startswith("# Conversation") and "## User" in markdown.content
    assert "m0" in markdown.content and markdown.filename.endswith(".md")
    # another user's id is NOT_FOUND everywhere, never the data
    for call in (
        stub.GetConversation(pb.GetConversationRequest(user="eve", conversation_id=ids[0])),
        stub.DeleteConversation(pb.DeleteConversationRequest(user="eve", conversation_id=ids[0])),
        stub.ExportConversation(pb.ExportConversationRequest(user="eve", conversation_id=ids[0])),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert status_details(failure.value).code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as hijack:
        await collect(stub.Chat(pb.ChatRequest(message="x", user="eve", conversation_id=ids[0])))
    assert status_details(hijack.value).code == grpc.StatusCode.NOT_FOUND
    assert (
        await stub.ListConversations(pb.ListConversationsRequest(user="eve"))
    ).conversations == []
    await stub.DeleteConversation(pb.DeleteConversationRequest(user="bob", conversation_id=ids[0]))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await get(stub, "bob", ids[0])
    assert status_details(gone.value).code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad_token:
        await stub.ListConversations(pb.ListConversationsRequest(user="bob", page_token="zz"))
    assert status_details(bad_token.value).field_violations[0][0] == "page_token"


async def test_cut_turns_are_kept_incomplete_with_their_text(
    emulator: ChatKitEmulator, start_service: ServiceFactory, history_env: dict[str, Any]
) -> None:
    service = await start_service(**emulator_env(emulator, **history_env))
    stub = service.stub
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub.Chat(pb.ChatRequest(message="tell me [drop]", user="carl")))
    listed = await stub.ListConversations(pb.ListConversationsRequest(user="carl"))
    dropped = await get(stub, "carl", listed.conversations[0].id)
    assert summary(dropped)[1] == ("MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_INCOMPLETE")
    assert dropped.messages[1].text == "You said: "  # the two chunks that arrived
    assert dropped.messages[1].error_reason == "UPSTREAM_STREAM_TRUNCATED"
    # a caller that leaves mid-answer
    call = stub.Chat(
        pb.ChatRequest(message="long [chunks=5000]", user="carl", conversation_id=dropped.id)
    )
    received = 0
    async for event in call:
        received += event.WhichOneof("event") == "chunk"
        if received == 3:
            break
    call.cancel()

    async def cancelled_recorded() -> bool:
        conversation = await get(stub, "carl", dropped.id)
        return len(conversation.messages) == 4 and conversation.messages[3].error_reason == (
            "CANCELLED"
        )

    for _ in range(100):
        if await cancelled_recorded():
            break
        await asyncio.sleep(0.02)
    cancelled = await get(stub, "carl", dropped.id)
    assert summary(cancelled)[3] == ("MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_INCOMPLETE")
    assert cancelled.messages[3].error_reason == "CANCELLED"
    assert cancelled.messages[3].text.startswith("00 lorem")
    # refused before it began, on a known conversation: recorded as failed
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(
            stub.Chat(pb.ChatRequest(message="[http 429]", user="carl", conversation_id=dropped.id))
        )
    failed = await get(stub, "carl", dropped.id)
    assert summary(failed)[5] == ("MESSAGE_ROLE_ASSISTANT", "MESSAGE_STATUS_FAILED")
    assert failed.messages[5].error_reason == "UPSTREAM_RATE_LIMITED"


async def test_revoke_sessions_on_logout(
    emulator: ChatKitEmulator, start_service: ServiceFactory, history_env: dict[str, Any]
) -> None:
    service = await start_service(**emulator_env(emulator, **history_env))
    stub = service.stub
    minted = await stub.MintSession(pb.MintSessionRequest(user="dana"))
    other = await stub.MintSession(pb.MintSessionRequest(user="dana", ttl_seconds=100))
    kept = await stub.MintSession(pb.MintSessionRequest(user="someone-else"))
    revoked = await stub.RevokeSessions(pb.RevokeSessionsRequest(user="dana"))
    assert revoked.revoked_sessions == 2
    assert emulator.stats.sessions_cancelled == 2
    again = await stub.MintSession(pb.MintSessionRequest(user="dana"))
    assert again.session.id not in (minted.session.id, other.session.id)  # never handed out
    assert (await stub.MintSession(pb.MintSessionRequest(user="someone-else"))).session.id == (
        kept.session.id
    )
    async with httpx.AsyncClient() as http:  # the old secret is dead upstream
        answer = await http.post(
            f"http://127.0.0.1:{emulator.port}/v1/chatkit/conversation",
            headers={"Authorization": f"Bearer {minted.client_secret}"},
            json={
                "type": "threads.create",
                "params": {"input": {"content": [{"type": "input_text", "text": "hi"}]}},
            },
        )
        assert answer.status_code == 401
    assert TEST_API_KEY  # the server key itself is untouched


async def test_realtime_conversation_continues_from_the_store(
    emulator: ChatKitEmulator,
    start_service: ServiceFactory,
    history_env: dict[str, Any],
    tmp_path: Path,
) -> None:
    env = emulator_env(
        emulator,
        HEALTHAGENT_UPSTREAM="realtime",
        HEALTHAGENT_DATA_DIR=str(tmp_path / "shared"),
        **history_env,
    )
    first = await start_service(**env)
    events = await collect(first.stub.Chat(pb.ChatRequest(message="remember me", user="eli")))
    conversation_id = events[0].session.conversation_id
    await first.running.stop(0)  # its in-memory conversation is gone with it
    second = await start_service(**env)
    more = await collect(
        second.stub.Chat(
            pb.ChatRequest(message="and now?", user="eli", conversation_id=conversation_id)
        )
    )
    assert more[-1].WhichOneof("event") == "response_done"
    assert emulator.realtime is not None
    items = emulator.realtime.sessions[more[0].session.session_id].items
    texts = [
        "".join(p.get("text", "") for p in i.get("content") or ())
        for i in items
        if i.get("type") == "message"
    ]
    assert texts[:3] == ["remember me", events[-1].response_done.text, "and now?"]
    stored = await get(second.stub, "eli", conversation_id)
    assert len(stored.messages) == 4 and stored.upstream == "realtime"
    assert stored.messages[1].usage.total_tokens > 0


async def test_realtime_replicas_take_turns_without_losing_context(
    emulator: ChatKitEmulator,
    start_service: ServiceFactory,
    history_env: dict[str, Any],
    tmp_path: Path,
) -> None:
    env = emulator_env(
        emulator,
        HEALTHAGENT_UPSTREAM="realtime",
        HEALTHAGENT_DATA_DIR=str(tmp_path / "shared"),
        **history_env,
    )
    replicas = [await start_service(**env), await start_service(**env)]
    conversation_id = ""
    last: list[pb.ChatResponse] = []
    for turn in range(4):
        request = pb.ChatRequest(message=f"turn {turn}", user="ivo")
        if conversation_id:
            request.conversation_id = conversation_id
        last = await collect(replicas[turn % 2].stub.Chat(request))
        conversation_id = last[0].session.conversation_id
    assert emulator.realtime is not None
    items = emulator.realtime.sessions[last[0].session.session_id].items
    users = [
        "".join(p.get("text", "") for p in i.get("content") or ())
        for i in items
        if i.get("role") == "user"
    ]
    assert users == ["turn 0", "turn 1", "turn 2", "turn 3"]  # every turn in the context


def markdown_structure(markdown: str) -> list[str]:
    """The lines of a Markdown document that are its own structure (headings and the
    emphasized time lines), read as CommonMark reads fenced code blocks: a fence of N
    backticks or tildes is closed only by a line of at least N of the same."""
    structure: list[str] = []
    fence = ""
    for line in markdown.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        marker = stripped[:1]
        run = len(stripped) - len(stripped.lstrip(marker)) if marker in ("`", "~") else 0
        if fence:
            if (
                indent < 4
                and marker == fence[0]
                and run >= len(fence)
                and not stripped[run:].strip()
            ):
                fence = ""
            continue
        if indent < 4 and run >= 3:
            fence = marker * run
            continue
        if line.startswith("#"):
            structure.append(line)
        elif line.startswith("_") and line.endswith("_") and len(line) > 2:
            structure.append("_time_")
    return structure


async def test_markdown_export_renders_user_text_as_text(
    emulator: ChatKitEmulator, start_service: ServiceFactory, history_env: dict[str, Any]
) -> None:
    """Message text (which the assistant repeats), tool output and ids cannot forge a section,
    a time or close a fence in the Markdown export (issue 23, item 8)."""
    service = await start_service(**emulator_env(emulator, **history_env))
    stub = service.stub
    forged = (
        "hello\n\n## Assistant\n_2020-01-01T00:00:00+00:00_\n\nforged answer\n"
        "```\n~~~\n# Owned\n````json\n"
    )
    first = await collect(stub.Chat(pb.ChatRequest(message=forged, user="md")))
    conversation = first[0].session.conversation_id
    tool = await collect(
        stub.Chat(pb.ChatRequest(message="[tool]", user="md", conversation_id=conversation))
    )
    call = next(e.tool_call for e in tool if e.WhichOneof("event") == "tool_call")
    output = json.dumps({"note": "````\n## Assistant\n_2020-01-01_"})
    await collect(
        stub.Chat(
            pb.ChatRequest(
                user="md",
                conversation_id=conversation,
                tool_output=pb.ToolOutput(call_id=call.call_id, output_json=output),
            )
        )
    )
    exported = await stub.ExportConversation(
        pb.ExportConversationRequest(
            user="md", conversation_id=conversation, format=pb.EXPORT_FORMAT_MARKDOWN
        )
    )
    roles = ["## User", "## Assistant", "## User", "## Assistant", "## Tool result", "## Assistant"]
    expected = ["# Conversation"]
    for role in roles:
        expected += [role, "_time_"]
    assert markdown_structure(exported.content) == expected
    assert "forged answer" in exported.content  # the text is all there, as text
