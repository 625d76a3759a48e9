"""A service built in this process from settings the test names, and the settings that point it
at the standalone emulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.config import Settings
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.server import RunningServer

TEST_API_KEY = "sk-test-emulator-key"
TEST_WORKFLOW = "wf_test"


def make_settings(**env: Any) -> Settings:
    """Settings from environment-variable names, e.g. make_settings(OPENAI_API_KEY="sk")."""
    env.setdefault("HEALTHAGENT_LOG_FORMAT", "json")
    return Settings.from_environment(**env)


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
