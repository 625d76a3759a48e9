"""The three ways the performance harness reads a scripted turn, each recording when every chunk
was sent (the `[stamp]` in its text) and when this client got it.

- `GrpcTurns`: a gRPC client of `HealthAgent.Chat`, for HealthAgent and for the bare server.
- `DirectTurns`: what an app does without HealthAgent: its own ChatKit session, then the SSE
  stream read straight from the emulator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import httpx

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.script import parse_stamp
from healthagent_service.upstream.chatkit import CHATKIT_BETA_HEADER
from healthagent_service.upstream.chatkit_events import TEXT_DELTA
from healthagent_service.upstream.sse import SSEDecoder

STREAMS_PER_CHANNEL = 100


def _connections_for(streams: int) -> int:
    """One connection per `STREAMS_PER_CHANNEL` streams, at least one."""
    return max(1, -(-streams // STREAMS_PER_CHANNEL))


@dataclass
class TurnSample:
    """One turn as a client saw it (times are CLOCK_MONOTONIC nanoseconds)."""

    started_ns: int
    sent_ns: list[int] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)
    error: str | None = None  # a status code name, or "TRUNCATED" for an OK turn missing text
    detail: str = ""  # the status message that came with `error`

    @property
    def chunks(self) -> int:
        return len(self.received_ns)


class TurnClient(Protocol):
    async def prepare(self, users: list[str]) -> None: ...

    async def turn(self, index: int, user: str, message: str) -> TurnSample: ...

    async def close(self) -> None: ...


class GrpcTurns:
    """`Chat` over `ceil(streams / 100)` channels, as a service-to-service caller would."""

    def __init__(self, address: str, streams: int) -> None:
        count = _connections_for(streams)
        # a distinct argument per channel, or gRPC would share one connection among them all
        self._channels = [
            grpc.aio.insecure_channel(address, options=[("bench.channel", index)])
            for index in range(count)
        ]
        self._stubs = [pb_grpc.HealthAgentStub(channel) for channel in self._channels]

    async def prepare(self, users: list[str]) -> None:
        for channel in self._channels:
            await channel.channel_ready()

    async def turn(self, index: int, user: str, message: str) -> TurnSample:
        sample = TurnSample(time.monotonic_ns())
        sent, received = sample.sent_ns, sample.received_ns
        text: list[str] = []
        final: str | None = None
        call = self._stubs[index % len(self._stubs)].Chat(
            pb.ChatRequest(message=message, user=user), timeout=300
        )
        try:
            async for event in call:
                now = time.monotonic_ns()
                kind = event.WhichOneof("event")
                if kind == "chunk":
                    received.append(now)
                    sent.append(parse_stamp(event.chunk.text))
                    text.append(event.chunk.text)
                elif kind == "response_done":
                    final = event.response_done.text
        except grpc.aio.AioRpcError as error:
            sample.error = error.code().name
            sample.detail = error.details() or ""
            return sample
        if final is None or final != "".join(text):
            sample.error = "TRUNCATED"
        return sample

    async def mint(self, index: int, user: str) -> None:
        await self._stubs[index % len(self._stubs)].MintSession(
            pb.MintSessionRequest(user=user), timeout=30
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class DirectTurns:
    """An app talking to ChatKit itself: one session per user, then SSE over httpx."""

    def __init__(self, base_url: str, api_key: str, workflow: str, streams: int) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._workflow = workflow
        # one pool per 100 streams, as HealthAgent shards its own (httpcore scans a whole pool
        # per request, which would make a single pool of 1,000 the bottleneck)
        count = _connections_for(streams)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._clients = [
            httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) for _ in range(count)
        ]
        self._secrets: dict[str, str] = {}

    async def prepare(self, users: list[str]) -> None:
        for user in users:
            if user in self._secrets:
                continue
            response = await self._clients[0].post(
                f"{self._base_url}/chatkit/sessions",
                json={"user": user, "workflow": {"id": self._workflow}},
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    CHATKIT_BETA_HEADER[0]: CHATKIT_BETA_HEADER[1],
                },
            )
            response.raise_for_status()
            self._secrets[user] = response.json()["client_secret"]

    async def turn(self, index: int, user: str, message: str) -> TurnSample:
        sample = TurnSample(time.monotonic_ns())
        sent, received = sample.sent_ns, sample.received_ns
        body: dict[str, Any] = {
            "type": "threads.create",
            "params": {
                "input": {
                    "content": [{"type": "input_text", "text": message}],
                    "attachments": [],
                    "quoted_text": "",
                    "inference_options": {},
                }
            },
            "metadata": {},
        }
        headers = {
            "Authorization": f"Bearer {self._secrets[user]}",
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
        }
        text: list[str] = []
        final: str | None = None
        client = self._clients[index % len(self._clients)]
        try:
            async with client.stream(
                "POST",
                f"{self._base_url}/chatkit/conversation",
                content=json.dumps(body),
                headers=headers,
            ) as response:
                if response.status_code != 200:
                    sample.error = f"HTTP_{response.status_code}"
                    return sample
                decoder = SSEDecoder()
                async for raw in response.aiter_bytes():
                    now = time.monotonic_ns()
                    for data in decoder.feed(raw):
                        event = json.loads(data)
                        if event["type"] == "thread.item.updated":
                            update = event["update"]
                            if update["type"] == TEXT_DELTA:
                                received.append(now)
                                sent.append(parse_stamp(update["delta"]))
                                text.append(update["delta"])
                        elif event["type"] == "thread.item.done":
                            item = event["item"]
                            if item["type"] == "assistant_message":
                                final = "".join(part["text"] for part in item["content"])
        except httpx.HTTPError as error:
            sample.error = type(error).__name__
            return sample
        if final is None or final != "".join(text):
            sample.error = "TRUNCATED"
        return sample

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()
