"""The fixtures: a clean environment, a standalone emulator, services and agent servers built on
it. The helpers they use live in tests/support/."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator, EmulatorConfig
from healthagent_service.emulator.realtime_emulator import (
    RealtimeEmulator,
    RealtimeEmulatorConfig,
)
from healthagent_service.server import create_server
from tests.support.service import (
    TEST_API_KEY,
    TEST_WORKFLOW,
    Service,
    ServiceFactory,
    emulator_env,
    make_settings,
)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come only from what a test passes, never from the machine's environment."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "HEALTHAGENT_")):
            monkeypatch.delenv(name)


@pytest.fixture
def realtime_config() -> RealtimeEmulatorConfig:
    """How the standalone emulator's Realtime side behaves; tests override it."""
    return RealtimeEmulatorConfig(
        api_key=TEST_API_KEY, chunk_delay_seconds=0.001, slow_first_byte_seconds=5.0
    )


@pytest.fixture
async def emulator(realtime_config: RealtimeEmulatorConfig) -> AsyncIterator[ChatKitEmulator]:
    """A standalone emulator on loopback ports: ChatKit and client secrets over HTTP, and the
    Realtime WebSocket (`emulator.realtime`)."""
    realtime = RealtimeEmulator(realtime_config)
    await realtime.start()
    server = ChatKitEmulator(
        EmulatorConfig(
            api_key=TEST_API_KEY,
            workflows=frozenset({TEST_WORKFLOW}),
            chunk_delay_seconds=0.001,
            slow_first_byte_seconds=5.0,
        ),
        realtime=realtime,
    )
    await server.start()
    yield server
    await server.close()
    await realtime.close()


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Factory: start_service(**env) starts a service on 127.0.0.1:0 with those settings
    (history in a SQLite file under the test's own directory unless env says otherwise)."""
    started: list[Service] = []

    async def start(**env: Any) -> Service:
        env.setdefault("HEALTHAGENT_DATA_DIR", str(tmp_path / f"data{len(started)}"))
        running = await create_server(make_settings(**env), "127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        service = Service(running, channel, pb_grpc.HealthAgentStub(channel))
        started.append(service)
        return service

    yield start
    for service in started:
        await service.channel.close()
        await service.running.stop(0)


@pytest.fixture
async def start_agent(emulator: ChatKitEmulator, tmp_path: Path) -> AsyncIterator[Any]:
    """Factory: start_agent(**env) starts an agent server (`tests/support/agents.py`) whose
    model is the standalone emulator."""
    from tests.support.agents import agent_servers  # the Agents SDK and ChatKit: only where used

    async with agent_servers(emulator, tmp_path) as start:
        yield start


@pytest.fixture
async def service(emulator: ChatKitEmulator, start_service: ServiceFactory) -> Service:
    """The service talking to the standalone emulator through the hosted-ChatKit code path."""
    return await start_service(**emulator_env(emulator))
