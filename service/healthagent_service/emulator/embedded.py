"""Starts the whole emulator (ChatKit over HTTP, Realtime over WebSocket) from the settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from healthagent_service.config import EMULATOR_WORKFLOW_ID, Settings
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator, EmulatorConfig
from healthagent_service.emulator.realtime_emulator import (
    RealtimeEmulator,
    RealtimeEmulatorConfig,
)


@dataclass
class Emulator:
    """Both sides of a running emulator, sharing one API key and its ephemeral secrets."""

    chatkit: ChatKitEmulator
    realtime: RealtimeEmulator
    host: str

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL would be."""
        return f"http://{self.host}:{self.chatkit.port}/v1"

    @property
    def realtime_url(self) -> str:
        """What OPENAI_REALTIME_URL would be."""
        return f"ws://{self.host}:{self.realtime.port}/v1/realtime"

    async def close(self) -> None:
        await self.chatkit.close()
        await self.realtime.close()


async def start_emulator(
    settings: Settings,
    api_key: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    realtime_port: int = 0,
    extra_workflows: Sequence[str] = (),
) -> Emulator:
    """Start the emulator for the configured workflow (and `extra_workflows`)."""
    workflows = {EMULATOR_WORKFLOW_ID, *extra_workflows}
    if settings.upstream.openai_workflow_id:
        workflows.add(settings.upstream.openai_workflow_id)
    delay = settings.emulator.chunk_delay_ms / 1000
    realtime = RealtimeEmulator(
        RealtimeEmulatorConfig(
            api_key=api_key,
            chunk_delay_seconds=delay,
            slow_first_byte_seconds=settings.emulator.slow_first_byte_seconds,
            session_max_seconds=settings.emulator.realtime_session_seconds,
        )
    )
    chatkit = ChatKitEmulator(
        EmulatorConfig(
            api_key=api_key,
            workflows=frozenset(workflows),
            chunk_delay_seconds=delay,
            slow_first_byte_seconds=settings.emulator.slow_first_byte_seconds,
        ),
        realtime=realtime,
    )
    await realtime.start(host, realtime_port)
    try:
        await chatkit.start(host, port)
    except BaseException:
        await realtime.close()
        raise
    return Emulator(chatkit, realtime, host)
