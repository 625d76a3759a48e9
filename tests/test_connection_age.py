"""HEALTHAGENT_GRPC_MAX_CONNECTION_AGE_SECONDS: old connections go away, their calls finish."""

from __future__ import annotations

import asyncio

import grpc

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect
from tests.support.service import ServiceFactory, emulator_env


async def _state_after(channel: grpc.aio.Channel, seconds: float) -> grpc.ChannelConnectivity:
    await asyncio.sleep(seconds)
    return channel.get_state(try_to_connect=False)


async def test_an_old_connection_goes_away_after_its_calls_finish(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    aged = await start_service(
        **emulator_env(emulator, HEALTHAGENT_GRPC_MAX_CONNECTION_AGE_SECONDS=1)
    )
    unaged = await start_service(**emulator_env(emulator))
    results = {}
    for name, service in (("aged", aged), ("unaged", unaged)):
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = pb_grpc.HealthAgentStub(channel)
            # a turn longer than the connection's age still ends OK with its whole answer
            events = await collect(
                stub.Chat(pb.ChatRequest(user="aging", message="[pace=250][chunks=8]"), timeout=30)
            )
            assert events[-1].WhichOneof("event") == "response_done"
            assert len([e for e in events if e.WhichOneof("event") == "chunk"]) == 8
            results[name] = await _state_after(channel, 2.5)
    # the aged server told the client to go (GOAWAY): the channel is idle, to reconnect on its
    # next call, possibly to another replica; the other keeps its connection
    assert results == {
        "aged": grpc.ChannelConnectivity.IDLE,
        "unaged": grpc.ChannelConnectivity.READY,
    }
