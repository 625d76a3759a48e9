"""Chat against a self-hosted ChatKit server built with the official `openai-chatkit` SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from tests.peers.chatkit_reference import TITLE, ReferenceServer
from tests.support.calls import collect, event_kinds, status_details
from tests.support.service import ServiceFactory

AUTH = ("X-ChatKit-Key", "self-hosted-secret")


@pytest.fixture
async def reference() -> AsyncIterator[ReferenceServer]:
    server = ReferenceServer(required_auth=AUTH)
    await server.start()
    yield server
    await server.stop()


def self_hosted_env(reference: ReferenceServer, auth: str | None) -> dict[str, str]:
    env = {"HEALTHAGENT_CHATKIT_URL": reference.url}
    if auth is not None:
        env["HEALTHAGENT_CHATKIT_AUTH_HEADER"] = auth
    return env


async def test_chat_new_and_continued_conversation(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: {AUTH[1]}"))
    first = await collect(service.stub.Chat(pb.ChatRequest(message="Hello", user="alice")))
    kinds = event_kinds(first)
    assert kinds[0] == "session" and kinds[-1] == "response_done"
    session = first[0].session
    assert session.session_id == "" and session.workflow_id == ""
    assert session.conversation_id in reference.chatkit.store.threads  # type: ignore[attr-defined]
    expected = "You said: Hello. This reply comes from the HealthAgent emulator."
    assert "".join(e.chunk.text for e in first if e.WhichOneof("event") == "chunk") == expected
    assert first[-1].response_done.text == expected
    second = await collect(
        service.stub.Chat(
            pb.ChatRequest(message="More", user="alice", conversation_id=session.conversation_id)
        )
    )
    assert second[0].session.conversation_id == session.conversation_id
    assert second[-1].response_done.text.startswith("You said: More.")
    assert set(reference.users_seen) == {"alice"}  # the end user is forwarded


async def test_tool_call_round_trip(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: {AUTH[1]}"))
    events = await collect(service.stub.Chat(pb.ChatRequest(message="[tool]", user="bob")))
    call = next(e.tool_call for e in events if e.WhichOneof("event") == "tool_call")
    answer = await collect(
        service.stub.Chat(
            pb.ChatRequest(
                user="bob",
                conversation_id=events[0].session.conversation_id,
                tool_output=pb.ToolOutput(
                    call_id=call.call_id, output_json=json.dumps({"steps": 1})
                ),
            )
        )
    )
    assert answer[-1].response_done.text == 'Thanks. The tool returned {"steps": 1}.'


async def test_threads_are_scoped_by_user_and_unknown_is_not_found(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: {AUTH[1]}"))
    mine = await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="carol")))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(
            service.stub.Chat(
                pb.ChatRequest(
                    message="hi", user="mallory", conversation_id=mine[0].session.conversation_id
                )
            )
        )
    assert status_details(failure.value).code == grpc.StatusCode.NOT_FOUND


async def test_stream_error_from_the_sdk_is_unavailable(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: {AUTH[1]}"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in service.stub.Chat(pb.ChatRequest(message="[error]", user="dan")):
            received.append(event)
    assert event_kinds(received).count("chunk") == 2
    assert status_details(failure.value).reason == "UPSTREAM_STREAM_ERROR"


async def test_wrong_auth_header_and_minting(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: wrong"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="erin")))
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "HEALTHAGENT_CHATKIT_AUTH_HEADER" in details.message
    assert "wrong" not in details.message
    with pytest.raises(grpc.aio.AioRpcError) as mint:
        await service.stub.MintSession(pb.MintSessionRequest(user="erin"))
    assert status_details(mint.value).reason == "MINT_NOT_SUPPORTED"


async def test_open_reasoning_workflow_across_a_tool_call_is_complete(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    reference.chatkit.open_workflow_before_tool_call = True
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: {AUTH[1]}"))
    events = await collect(service.stub.Chat(pb.ChatRequest(message="[tool]", user="fred")))
    kinds = event_kinds(events)
    assert kinds[-1] == "response_done" and "tool_call" in kinds
    assert events[-1].response_done.awaiting_tool_output
    workflow = [
        e.passthrough
        for e in events
        if e.WhichOneof("event") == "passthrough" and '"workflow"' in e.passthrough.json
    ]
    assert workflow and workflow[0].type == "thread.item.added"


async def test_thread_title_is_recorded(
    reference: ReferenceServer, start_service: ServiceFactory
) -> None:
    service = await start_service(**self_hosted_env(reference, f"{AUTH[0]}: {AUTH[1]}"))
    events = await collect(service.stub.Chat(pb.ChatRequest(message="[title] hi", user="gia")))
    assert any(
        e.passthrough.type == "thread.updated"
        for e in events
        if e.WhichOneof("event") == "passthrough"
    )
    stored = await service.stub.GetConversation(
        pb.GetConversationRequest(user="gia", conversation_id=events[0].session.conversation_id)
    )
    assert stored.conversation.title == TITLE
