"""When the caller leaves, the upstream request is closed at once (observed at the emulator)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.conftest import Service


async def wait_for(predicate: object, timeout: float = 3.0) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not reached in {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


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
