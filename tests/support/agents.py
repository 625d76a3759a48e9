"""The agent server for the tests: the real ChatKit server and Agents SDK, in this process, on a
loopback port, with the emulator's model APIs as its model; and a service pointed at it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.agent.app import RunningAgentServer, start_agent_server
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.model_api import ModelRequestRecord
from tests.support.service import TEST_API_KEY, Service, ServiceFactory, make_settings

SERVICE_AUTH = ("Authorization", "Bearer service-credential-of-the-tests")
TOKEN_SECRET = "token-secret-of-the-tests-0123456789abcdef"

AgentFactory = Callable[..., Awaitable[RunningAgentServer]]


def agent_env(emulator: ChatKitEmulator, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Settings of an agent server whose model is `emulator`."""
    env: dict[str, Any] = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "HEALTHAGENT_AGENT_BASE_URL": f"http://127.0.0.1:{emulator.port}/v1",
        "HEALTHAGENT_DATA_DIR": str(data_dir),
        "HEALTHAGENT_CHATKIT_AUTH_HEADER": f"{SERVICE_AUTH[0]}: {SERVICE_AUTH[1]}",
        "HEALTHAGENT_AGENT_TOKEN_SECRET": TOKEN_SECRET,
        "HEALTHAGENT_SHUTDOWN_GRACE_SECONDS": 1,
    }
    env.update(overrides)
    return env


@contextlib.asynccontextmanager
async def agent_servers(emulator: ChatKitEmulator, tmp_path: Path) -> AsyncIterator[AgentFactory]:
    """Factory: start(**env) starts an agent server on 127.0.0.1 (port 0 unless `listen` says
    otherwise) with threads in the test's directory unless env says otherwise; all are stopped
    at the end."""
    started: list[RunningAgentServer] = []

    async def start(listen: str = "127.0.0.1:0", **env: Any) -> RunningAgentServer:
        settings = make_settings(**agent_env(emulator, tmp_path / "agent", **env))
        running = await start_agent_server(settings, listen)
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            await running.stop()


def service_env(agent: RunningAgentServer, **overrides: Any) -> dict[str, Any]:
    """Settings of a service whose upstream is `agent`."""
    env: dict[str, Any] = {
        "HEALTHAGENT_UPSTREAM": "agent",
        "HEALTHAGENT_CHATKIT_URL": agent.url,
        "HEALTHAGENT_CHATKIT_AUTH_HEADER": f"{SERVICE_AUTH[0]}: {SERVICE_AUTH[1]}",
        "HEALTHAGENT_AGENT_TOKEN_SECRET": TOKEN_SECRET,
    }
    env.update(overrides)
    return env


async def agent_service(
    start_agent: AgentFactory, start_service: ServiceFactory, **agent_settings: Any
) -> tuple[RunningAgentServer, Service]:
    """An agent server and a service in front of it."""
    agent = await start_agent(**agent_settings)
    return agent, await start_service(**service_env(agent))


def chat(
    service: Service,
    message: str | None = None,
    *,
    user: str = "alice",
    conversation_id: str | None = None,
    tool_output: pb.ToolOutput | None = None,
    timeout: float = 30.0,
) -> Any:
    """A Chat call (iterate it for the events)."""
    request = pb.ChatRequest(user=user, conversation_id=conversation_id)
    if tool_output is not None:
        request.tool_output.CopyFrom(tool_output)
    else:
        request.message = message or ""
    return service.stub.Chat(request, timeout=timeout)


def user_messages(record: ModelRequestRecord) -> list[str]:
    return [text for role, text in record.input if role == "user"]


def chatkit_request(kind: str, **params: Any) -> bytes:
    return json.dumps({"type": kind, "params": params, "metadata": {}}).encode()


def user_input(text: str) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": [],
        "inference_options": {},
    }


async def post_chatkit(
    agent: RunningAgentServer, body: bytes, headers: dict[str, str]
) -> tuple[int, list[dict[str, Any]]]:
    """POST a ChatKit request straight to the agent server: (status, the SSE events or the
    JSON body as a one-item list)."""
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST", agent.url, content=body, headers={"content-type": "application/json", **headers}
        ) as response,
    ):
        raw = await response.aread()
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [
            json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")
        ]
        return response.status_code, events
    return response.status_code, [json.loads(raw)] if raw else []
