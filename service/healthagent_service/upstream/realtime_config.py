"""What the Realtime adapter is configured with, and what it counts: shared by its parts (secrets,
sockets, the warm pool, conversations, the turn loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RealtimeConfig:
    """Where and how to reach the Realtime API. `api_key` is None when not configured."""

    base_url: str
    websocket_url: str
    api_key: str | None
    model: str = "gpt-realtime"
    instructions: str = ""
    tools: tuple[dict[str, Any], ...] = ()
    secret_ttl_seconds: int = 600
    refresh_fraction: float = 0.8
    warm_sockets: int = 2
    warm_socket_max_idle_seconds: float = 300.0
    conversation_idle_seconds: float = 300.0
    max_conversations: int = 10_000
    socket_max_age_seconds: float = 55 * 60.0
    connect_attempts: int = 4
    backoff_base_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    open_timeout_seconds: float = 10.0
    retry_after_seconds: float = 1.0
    api_key_setting: str = "OPENAI_API_KEY"

    def __repr__(self) -> str:  # never show the key
        return f"RealtimeConfig(websocket_url={self.websocket_url!r}, model={self.model!r})"


@dataclass(slots=True)
class RealtimeStats:
    """Counters for metrics and tests."""

    sockets_opened: int = 0
    warm_hits: int = 0
    warm_misses: int = 0
    reconnects: int = 0
    replayed_items: int = 0
    connect_failures: int = 0
