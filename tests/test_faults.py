"""Faults injected through the emulator, over real sockets: every one ends in a deliberate
status, the partial text is kept in the history, and no stream ends OK with a truncated answer."""

from __future__ import annotations

import socket

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.script import plan_reply
from tests.conftest import ServiceFactory, emulator_env, event_kinds, status_details

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ALL_CHUNKS = -1

FAULTS = [
    # (trigger, status, reason, chunks that reach the caller first)
    ("[drop]", UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", 2),
    ("[stall]", UNAVAILABLE, "UPSTREAM_TIMEOUT", 2),
    ("[slow]", UNAVAILABLE, "UPSTREAM_TIMEOUT", 0),
    ("[malformed]", UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR", 2),
    ("[nodata]", UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", ALL_CHUNKS),
    ("[huge]", UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR", 2),
    ("[noend]", UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", 2),
    ("[error]", UNAVAILABLE, "UPSTREAM_STREAM_ERROR", 2),
    ("[http 429]", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", 0),
    ("[http 500]", UNAVAILABLE, "UPSTREAM_ERROR", 0),
    ("[http 503]", UNAVAILABLE, "UPSTREAM_ERROR", 0),
    ("[http 401]", UNAVAILABLE, "UPSTREAM_SESSION_REJECTED", 0),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f[0] for f in FAULTS])
async def test_fault_gives_a_deliberate_status_and_keeps_the_partial_text(
    fault: tuple[str, grpc.StatusCode, str, int],
    emulator: ChatKitEmulator,
    start_service: ServiceFactory,
) -> None:
    trigger, code, reason, chunks = fault
    if chunks == ALL_CHUNKS:
        chunks = len(plan_reply(f"tell me {trigger}").chunks)
    service = await start_service(
        **emulator_env(emulator, HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS=0.5)
    )
    stub = service.stub
    first = [e async for e in stub.Chat(pb.ChatRequest(message="hello", user="fay"))]
    conversation_id = first[0].session.conversation_id
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in stub.Chat(
            pb.ChatRequest(
                message=f"tell me {trigger}", user="fay", conversation_id=conversation_id
            )
        ):
            received.append(event)
    details = status_details(failure.value)
    assert (details.code, details.reason) == (code, reason)
    assert event_kinds(received).count("chunk") == chunks
    assert "response_done" not in event_kinds(received)  # never OK with a truncated answer
    if code is UNAVAILABLE or code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert details.retry_delay_seconds is not None
    history = (
        await stub.GetConversation(
            pb.GetConversationRequest(user="fay", conversation_id=conversation_id)
        )
    ).conversation
    answer = history.messages[-1]
    assert answer.role == pb.MESSAGE_ROLE_ASSISTANT and answer.error_reason == reason
    partial = "".join(e.chunk.text for e in received if e.WhichOneof("event") == "chunk")
    assert answer.text == partial
    expected_status = pb.MESSAGE_STATUS_INCOMPLETE if partial else pb.MESSAGE_STATUS_FAILED
    assert answer.status == expected_status


async def test_connection_refused(start_service: ServiceFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = await start_service(
        HEALTHAGENT_UPSTREAM="chatkit",
        OPENAI_API_KEY="sk-x",
        OPENAI_WORKFLOW_ID="wf",
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        [e async for e in service.stub.Chat(pb.ChatRequest(message="hi", user="u"))]
    assert status_details(failure.value).reason == "UPSTREAM_UNAVAILABLE"
