"""Where the agent's model is: OpenAI, an OpenAI-compatible server, or the emulator.

- `OPENAI_API_KEY` set: OpenAI (or `HEALTHAGENT_AGENT_BASE_URL`, default `OPENAI_BASE_URL`).
- `HEALTHAGENT_AGENT_BASE_URL` set without a key: an OpenAI-compatible server that needs none
  (Ollama, vLLM, LiteLLM).
- Neither: the built-in emulator's Responses and Chat Completions APIs, started in this process
  on a loopback port, so the whole agent path runs offline, for real.
`HEALTHAGENT_AGENT_API` picks the Responses API (default) or Chat Completions.

The client does not retry: a retry of the model request would only delay the caller, who is
told when to retry (RetryInfo) and decides.

A Chat Completions stream that ends without `data: [DONE]` is cut, not finished: the Agents
SDK checks for a finish reason only on OpenAI's own endpoint and would take the cut answer for
a whole one, so `CompleteStreamsOnly` raises `TruncatedModelStream` at its end instead. One that
finishes with `finish_reason` `length` or `content_filter` stopped early, which the SDK takes
for a whole answer unless no text came at all: `CompleteStreamsOnly` raises
`ModelAnswerIncompleteError` at its end (the Responses API's `response.incomplete` the SDK raises on
itself).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
from agents import Model, ModelSettings, RunConfig, set_tracing_disabled
from agents.exceptions import _mark_error_to_drain_stream_events  # pinned SDK: see pyproject
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from healthagent_service.config import AgentModelApi, Settings
from healthagent_service.emulator.embedded import Emulator, start_emulator

# Ollama and friends need some key in the header, and ignore it.
_KEYLESS_PLACEHOLDER = "unused"
_DONE_MARKER = b"data: [DONE]"
# a finish reason that stops the answer short; a quote inside text is escaped, so no text matches
_STOPPED_EARLY = re.compile(rb'"finish_reason"\s*:\s*"(length|content_filter)"')
# bytes kept from one piece to the next, so that a marker split between two is still seen
_TAIL_BYTES = 64


class DefaultModelProvider(OpenAIProvider):
    """OpenAI's provider, with HEALTHAGENT_AGENT_MODEL for every agent that names no model
    (handoff targets included), instead of the Agents SDK's default."""

    def __init__(self, default_model: str | None, **options: Any) -> None:
        super().__init__(**options)
        self._default_model = default_model

    def get_model(self, model_name: str | None) -> Model:
        return super().get_model(model_name or self._default_model)


class TruncatedModelStream(httpx2.RemoteProtocolError):
    """A Chat Completions stream ended without `data: [DONE]`."""


class ModelAnswerIncompleteError(Exception):
    """The model stopped its answer early: `finish_reason` `length` or `content_filter`."""

    def __init__(self, finish_reason: str) -> None:
        super().__init__(f"the model stopped its answer early (finish_reason {finish_reason})")
        self.finish_reason = finish_reason
        # as the SDK marks its own terminal failures: the run's queued events (the last text
        # deltas) reach the caller before the error does, or the answer would lose its tail
        _mark_error_to_drain_stream_events(self)


class _RequireWholeAnswer(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tail = b""
        stopped_early: bytes | None = None
        async for piece in self._inner:
            window = tail + piece
            if stopped_early is None and b"finish_reason" in window:
                found = _STOPPED_EARLY.search(window)
                stopped_early = found.group(1) if found else None
            if stopped_early is not None and _DONE_MARKER in window:
                # before the client reads [DONE]: after it, the openai client only drains the
                # body, swallowing errors, and the run would end as if the answer were whole
                yield piece[: max(0, piece.find(_DONE_MARKER))]
                raise ModelAnswerIncompleteError(stopped_early.decode())
            tail = window[-_TAIL_BYTES:]
            yield piece
        if not tail.rstrip().endswith(_DONE_MARKER):
            raise TruncatedModelStream("the Chat Completions stream ended without [DONE]")

    async def aclose(self) -> None:
        await self._inner.aclose()


class CompleteStreamsOnly(httpx2.AsyncBaseTransport):
    """Passes requests to `inner`; streamed Chat Completions answers must end with [DONE],
    and not stopped early."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        if streamed and request.url.path.endswith("/chat/completions"):
            assert isinstance(response.stream, httpx2.AsyncByteStream)
            response.stream = _RequireWholeAnswer(response.stream)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class ModelConnection:
    """The model API the agent uses, and the emulator behind it when there is one."""

    client: AsyncOpenAI
    api: AgentModelApi
    base_url: str
    emulator: Emulator | None
    # the Agents SDK's traces go to OpenAI: only when asked for, and never without a key
    tracing: bool
    # HEALTHAGENT_AGENT_MODEL: for agents that name none (None: the Agents SDK's default)
    default_model: str | None

    def run_config(self) -> RunConfig:
        """How every run reaches the model."""
        provider = DefaultModelProvider(
            self.default_model,
            openai_client=self.client,
            use_responses=self.api is AgentModelApi.RESPONSES,
        )
        # the Agents SDK asks a Chat Completions server for usage only if it is OpenAI's own
        settings = (
            ModelSettings(include_usage=True)
            if self.api is AgentModelApi.CHAT_COMPLETIONS
            else None
        )
        return RunConfig(
            model_provider=provider, model_settings=settings, tracing_disabled=not self.tracing
        )

    @property
    def description(self) -> str:
        api = "Responses" if self.api is AgentModelApi.RESPONSES else "Chat Completions"
        if self.emulator is not None:
            return f"EMULATED model ({api} API) - replies are simulated, not OpenAI"
        return f"{api} API at {self.base_url}"

    async def close(self) -> None:
        await self.client.close()
        if self.emulator is not None:
            await self.emulator.close()


async def connect_model(settings: Settings) -> ModelConnection:
    """The model API for these settings (starting the emulator when nothing is configured)."""
    tracing = settings.agent.tracing and settings.upstream.openai_api_key is not None
    set_tracing_disabled(not tracing)
    api_key = (
        settings.upstream.openai_api_key.get_secret_value()
        if settings.upstream.openai_api_key
        else None
    )
    emulator: Emulator | None = None
    if api_key is None and settings.agent.base_url is None:
        api_key = f"sk-emulator-{secrets.token_urlsafe(16)}"
        emulator = await start_emulator(settings, api_key)
        base_url = emulator.base_url
    else:
        base_url = settings.agent.base_url or settings.upstream.openai_base_url
    client = AsyncOpenAI(
        api_key=api_key or _KEYLESS_PLACEHOLDER,
        base_url=base_url,
        max_retries=0,
        http_client=DefaultAsyncHttpxClient(
            transport=CompleteStreamsOnly(httpx2.AsyncHTTPTransport())
        ),
        timeout=httpx2.Timeout(
            settings.upstream.read_timeout_seconds,
            connect=settings.upstream.connect_timeout_seconds,
        ),
    )
    return ModelConnection(
        client, settings.agent.api, base_url, emulator, tracing, settings.agent.model
    )
