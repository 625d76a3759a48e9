"""A caller that reads slowly: flow control holds the upstream back, and a caller that stops
reading for too long gets a clear status instead of a growing buffer."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import status_details, wait_for
from tests.support.service import ServiceFactory, emulator_env


@pytest.fixture
def no_delay_emulator(emulator: ChatKitEmulator) -> ChatKitEmulator:
    emulator.config = type(emulator.config)(
        api_key=emulator.config.api_key,
        workflows=emulator.config.workflows,
        chunk_delay_seconds=0.0,
    )
    return emulator


async def test_flow_control_reaches_the_upstream(
    no_delay_emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    emulator = no_delay_emulator
    service = await start_service(**emulator_env(emulator))
    # Without BDP probing the caller's gRPC transport keeps a fixed window; with it, the
    # caller's own gRPC library grows its window every second or so and buffers thousands more
    # messages on the caller's side, which would blur what this test looks at: the service.
    channel = grpc.aio.insecure_channel(service.target, options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.HealthAgentStub(channel).Chat(
        pb.ChatRequest(message="[chunks=100000]", user="slow")
    )
    events = call.__aiter__()
    await events.__anext__()
    # The caller reads nothing more: after the buffers on the way fill up, the emulator can
    # send no more, because the service stops reading when it cannot write.
    await asyncio.sleep(0.4)
    samples = []
    for _ in range(5):
        await asyncio.sleep(0.4)
        samples.append(emulator.stats.chunks_sent)
    # Held back: far from all 100,000 chunks went out, and the count stood still throughout.
    assert max(samples) < 75_000, samples
    assert all(a == b for a, b in itertools.pairwise(samples)), samples
    call.cancel()
    await wait_for(lambda: emulator.stats.streams_open == 0)
    await channel.close()


async def test_a_stalled_caller_is_cut_off_with_a_clear_status(
    no_delay_emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    emulator = no_delay_emulator
    service = await start_service(**emulator_env(emulator, HEALTHAGENT_CLIENT_STALL_SECONDS=0.5))
    # Without BDP probing the caller's transport keeps its 64 KiB window, like a small client:
    # once it is full and the app reads nothing, the service's writes wait.
    channel = grpc.aio.insecure_channel(service.target, options=[("grpc.http2.bdp_probe", 0)])
    stub = pb_grpc.HealthAgentStub(channel)
    call = stub.Chat(pb.ChatRequest(message="[chunks=200000]", user="stalled"))
    events = call.__aiter__()
    await events.__anext__()
    await asyncio.sleep(1.5)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in events:
            pass
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "CLIENT_TOO_SLOW"
    await wait_for(lambda: emulator.stats.streams_open == 0)  # the upstream was closed too
    # the history says what the caller was told (issue 23, item 9)
    listed = await stub.ListConversations(pb.ListConversationsRequest(user="stalled"))
    stored = await stub.GetConversation(
        pb.GetConversationRequest(user="stalled", conversation_id=listed.conversations[0].id)
    )
    answer = stored.conversation.messages[-1]
    assert (answer.status, answer.error_reason) == (pb.MESSAGE_STATUS_INCOMPLETE, "CLIENT_TOO_SLOW")
    # A caller that keeps reading, however slowly, is not cut off.
    steady = [e async for e in stub.Chat(pb.ChatRequest(message="[chunks=5]", user="steady"))]
    assert steady[-1].WhichOneof("event") == "response_done"
    await channel.close()
