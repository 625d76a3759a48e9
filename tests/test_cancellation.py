"""When the caller leaves, the upstream request is closed at once (observed at the emulator)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc
import httpx
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import status_details, wait_for
from tests.support.service import Service, ServiceFactory, emulator_env


async def test_client_cancel_closes_the_upstream_request(
    service: Service, emulator: ChatKitEmulator
) -> None:
    call = service.stub.Chat(pb.ChatRequest(message="long [chunks=5000]", user="u"))
    async for event in call:
        if event.WhichOneof("event") == "chunk":
            break
    assert emulator.stats.streams_open == 1
    call.cancel()
    elapsed = await wait_for(lambda: emulator.stats.streams_disconnected == 1)
    assert emulator.stats.streams_open == 0
    assert emulator.stats.chunks_sent < 5000
    assert elapsed < 2.0


async def test_deadline_closes_the_upstream_request(
    service: Service, emulator: ChatKitEmulator
) -> None:
    call = service.stub.Chat(pb.ChatRequest(message="wait [slow]", user="u"), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in call:
            pass
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(lambda: emulator.stats.streams_disconnected == 1)
    assert emulator.stats.streams_open == 0 and emulator.stats.streams_completed == 0


async def test_cancelled_streams_leave_nothing_open(
    service: Service, emulator: ChatKitEmulator
) -> None:
    calls = [
        service.stub.Chat(pb.ChatRequest(message="[chunks=5000]", user=f"u{i}")) for i in range(20)
    ]
    for call in calls:
        async for event in call:
            if event.WhichOneof("event") == "chunk":
                break
    for call in calls:
        call.cancel()
    await wait_for(lambda: emulator.stats.streams_disconnected == 20)
    assert emulator.stats.streams_open == 0
    # the service still works afterwards
    done = [e async for e in service.stub.Chat(pb.ChatRequest(message="hi", user="u0"))]
    assert done[-1].WhichOneof("event") == "response_done"


async def test_callers_leaving_during_a_write_are_not_errors(
    emulator: ChatKitEmulator, start_service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Callers that stop reading and whose deadline passes while a write waits on flow control:
    gRPC may fail the write before it cancels the handler. That is the caller leaving, not an
    INTERNAL error with a traceback (issue 23, item 9)."""
    service = await start_service(
        **emulator_env(
            emulator,
            HEALTHAGENT_METRICS_LISTEN="127.0.0.1:0",
            HEALTHAGENT_RATE_LIMIT_PER_MINUTE=0,
            HEALTHAGENT_MAX_STREAMS_PER_USER=0,
        )
    )

    async def leave_mid_write(index: int) -> None:
        # a connection of its own: its flow-control window fills up on its own
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = pb_grpc.HealthAgentStub(channel)
            request = pb.ChatRequest(message="[chunks=100000]", user=f"leaver{index}")
            call = stub.Chat(request, timeout=1.0 + (index % 10) * 0.03)
            with pytest.raises(grpc.aio.AioRpcError) as left:
                async for _ in call:
                    await asyncio.sleep(1.5)  # reads nothing more before the deadline
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    for round_ in range(4):
        await asyncio.gather(*(leave_mid_write(round_ * 40 + i) for i in range(40)))
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{service.running.metrics_port}/metrics")).text
    assert 'reason="INTERNAL"' not in metrics
    logged = capsys.readouterr().out
    assert "unexpected error" not in logged and "Traceback" not in logged
    # and the turns that had begun (the upstream named the conversation in time) are recorded
    # as cut off: DEADLINE_EXCEEDED when the service's deadline passed first, CANCELLED when the
    # caller's own deadline timer cancelled the call a moment before (the two cannot be told
    # apart then)
    reasons = set()
    for index in range(160):
        user = f"leaver{index}"
        listed = await service.stub.ListConversations(pb.ListConversationsRequest(user=user))
        for conversation in listed.conversations:
            stored = await service.stub.GetConversation(
                pb.GetConversationRequest(user=user, conversation_id=conversation.id)
            )
            reasons.add(stored.conversation.messages[-1].error_reason)
    assert "DEADLINE_EXCEEDED" in reasons and reasons <= {"DEADLINE_EXCEEDED", "CANCELLED"}


async def test_turns_cut_by_shutdown_are_recorded_as_the_caller_was_told(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    data = tmp_path / "cut"
    service = await start_service(**emulator_env(emulator, HEALTHAGENT_DATA_DIR=str(data)))
    call = service.stub.Chat(pb.ChatRequest(message="[chunks=100000]", user="late"))
    events = call.__aiter__()
    await events.__anext__()
    stopping = asyncio.ensure_future(service.running.stop(0.2))
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        async for _ in events:
            pass
    assert status_details(cut.value).reason == "SHUTTING_DOWN"
    await stopping
    with sqlite3.connect(data / "healthagent.db") as db:
        reasons = db.execute(
            "SELECT error_reason FROM messages WHERE role = 'assistant'"
        ).fetchall()
    assert reasons == [("SHUTTING_DOWN",)]
