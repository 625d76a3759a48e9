"""Shared fixtures: a standalone emulator, services built on it, and status helpers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.config import Settings
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator, EmulatorConfig
from healthagent_service.emulator.realtime_emulator import (
    RealtimeEmulator,
    RealtimeEmulatorConfig,
)
from healthagent_service.server import RunningServer, create_server

TEST_API_KEY = "sk-test-emulator-key"
TEST_WORKFLOW = "wf_test"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come only from what a test passes, never from the machine's environment."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "HEALTHAGENT_")):
            monkeypatch.delenv(name)


def make_settings(**env: Any) -> Settings:
    """Settings from environment-variable names, e.g. make_settings(OPENAI_API_KEY="sk")."""
    env.setdefault("HEALTHAGENT_LOG_FORMAT", "json")
    return Settings(**env)


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


def emulator_env(emulator: ChatKitEmulator, **overrides: Any) -> dict[str, Any]:
    """Environment that points the service at `emulator` as if it were hosted ChatKit."""
    env: dict[str, Any] = {
        "HEALTHAGENT_UPSTREAM": "chatkit",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{emulator.port}/v1",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_WORKFLOW_ID": TEST_WORKFLOW,
        "HEALTHAGENT_REALTIME_WARM_SOCKETS": 0,
    }
    if emulator.realtime is not None:
        env["OPENAI_REALTIME_URL"] = f"ws://127.0.0.1:{emulator.realtime.port}/v1/realtime"
    env.update(overrides)
    return env


@dataclass
class Service:
    """A running service and an async stub connected to it over a real socket."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.HealthAgentStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


ServiceFactory = Callable[..., Awaitable[Service]]


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
    """Factory: start_agent(**env) starts an agent server (`tests/agents.py`) whose model is
    the standalone emulator."""
    from tests.agents import agent_servers  # the Agents SDK and ChatKit: only where used

    async with agent_servers(emulator, tmp_path) as start:
        yield start


@pytest.fixture
async def service(emulator: ChatKitEmulator, start_service: ServiceFactory) -> Service:
    """The service talking to the standalone emulator through the hosted-ChatKit code path."""
    return await start_service(**emulator_env(emulator))


async def collect(call: Any) -> list[pb.ChatResponse]:
    """Every event of a Chat call (raises the call's error, if any)."""
    return [event async for event in call]


@dataclass
class StatusDetails:
    """A failed call's code, message and google.rpc details."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    field_violations: list[tuple[str, str]]
    retry_delay_seconds: float | None


def status_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> StatusDetails:
    """Parse the `grpc-status-details-bin` trailer into its parts."""
    trailers: Any = error.trailing_metadata() or ()
    raw = next(value for key, value in trailers if key == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    reason, metadata, violations, retry = "", {}, [], None
    for detail in status.details:
        detail: any_pb2.Any  # type: ignore[no-redef]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "healthagent.v1"
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            retry = info_retry.retry_delay.seconds + info_retry.retry_delay.nanos / 1e9
    assert reason, "every error carries an ErrorInfo with a reason"
    return StatusDetails(
        error.code(),
        status.message,
        reason,
        metadata,
        violations,
        retry,
    )


def event_kinds(events: list[pb.ChatResponse]) -> list[str]:
    """The oneof name of each event."""
    return [str(event.WhichOneof("event")) for event in events]
