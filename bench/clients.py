"""The three ways the performance harness reads a scripted turn, each recording when every chunk
was sent (the `[stamp]` in its text) and when this client got it.

- `GrpcTurns`: a gRPC client of `HealthAgent.Chat`, for HealthAgent and for the bare server.
- `DirectTurns`: what an app does without HealthAgent: its own ChatKit session, then the SSE
  stream read straight from the emulator.
- `GrpcWebTurns` and `SeedSseTurns`: `serve --http`'s gateway, gRPC-Web (binary) and the seeds'
  SSE contract, each over one keep-alive HTTP/1.1 connection per stream (as browsers with a
  stream each would), read by an asyncio protocol and llhttp (`httptools`), so that the client's
  own CPU a chunk stays small beside the server's.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import grpc
import httptools
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


# -- the HTTP gateway (`serve --http`) ----------------------------------------------------------

GRPC_WEB_CHAT_PATH = "/healthagent.v1.HealthAgent/Chat"
SEED_PATH = "/functions/v1/health-agent"
TURN_TIMEOUT_SECONDS = 300.0  # as GrpcTurns' deadline
# under uvicorn's keep-alive timeout (5 s): a connection idle longer is not reused, or a request
# could cross the server's close of it (paced turns start up to a turn after the warm-up)
IDLE_SECONDS = 4.0
_GRPC_WEB_FRAME = struct.Struct(">BI")
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class _Http1(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time. llhttp parses the response;
    every piece of body goes to the request's `on_piece` with the time its bytes arrived
    (CLOCK_MONOTONIC nanoseconds, taken before any parsing)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True  # until a response says otherwise
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.idle_since = time.monotonic()
        self._parser = httptools.HttpResponseParser(self)
        self._arrived = 0
        self._on_piece: Callable[[bytes, int], None] = _ignore_piece
        self._done: asyncio.Future[None] | None = None

    @property
    def reusable(self) -> bool:
        return (
            not self.closed
            and self.keep_alive
            and self._done is None
            and time.monotonic() - self.idle_since < IDLE_SECONDS
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._arrived = time.monotonic_ns()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._end(ConnectionError(f"malformed HTTP response: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._end(ConnectionError(str(exc) if exc else "the server closed the connection"))

    # llhttp's callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._on_piece(body, self._arrived)

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._end(None)

    def _end(self, error: Exception | None) -> None:
        done = self._done
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    async def exchange(self, request: bytes, on_piece: Callable[[bytes, int], None]) -> None:
        """Send `request` (head and body) and return once its whole response has been read."""
        assert self.transport is not None and self._done is None
        self.status, self.headers, self._on_piece = 0, {}, on_piece
        self._done = asyncio.get_running_loop().create_future()
        try:
            self.transport.write(request)
            await self._done
        except BaseException:
            self.close()  # a response cut short leaves the connection in no known state
            raise
        finally:
            self._done = None
            self._on_piece = _ignore_piece
            self.idle_since = time.monotonic()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _ignore_piece(piece: bytes, arrived_ns: int) -> None:
    pass


class _Http1Pool:
    """One connection per stream index, opened again when the last one cannot be reused."""

    def __init__(self, address: str, streams: int) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self._connections: list[_Http1 | None] = [None] * streams

    async def _connect(self) -> _Http1:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Http1, self.host, self.port)
        return protocol

    async def open(self) -> None:
        self._connections = list(
            await asyncio.gather(*(self._connect() for _ in self._connections))
        )

    async def exchange(
        self, index: int, request: bytes, on_piece: Callable[[bytes, int], None]
    ) -> _Http1:
        connection = self._connections[index]
        if connection is None or not connection.reusable:
            if connection is not None:
                connection.close()
            connection = self._connections[index] = await self._connect()
        async with asyncio.timeout(TURN_TIMEOUT_SECONDS):
            await connection.exchange(request, on_piece)
        return connection

    async def exchange_for(
        self,
        sample: TurnSample,
        index: int,
        request: bytes,
        on_piece: Callable[[bytes, int], None],
    ) -> _Http1 | None:
        """`exchange`, with a failure to connect or to finish in time noted in `sample`."""
        try:
            return await self.exchange(index, request, on_piece)
        except (OSError, TimeoutError) as error:
            sample.error, sample.detail = type(error).__name__, str(error)
            return None

    def request_head(self, path: str, content_type: str, length: int, extra: str = "") -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n{extra}\r\n"
        ).encode()

    async def close(self) -> None:
        for connection in self._connections:
            if connection is not None:
                connection.close()


class _GrpcWebChat:
    """Reads one gRPC-Web `Chat` response body: 5-byte-framed messages, then a trailers frame
    (flag 0x80) with `grpc-status` and `grpc-message`."""

    def __init__(self, sample: TurnSample) -> None:
        self.sample = sample
        self.text: list[str] = []
        self.final: str | None = None
        self.trailers: dict[str, str] = {}
        self._pending = b""

    def feed(self, piece: bytes, arrived_ns: int) -> None:
        data = self._pending + piece if self._pending else piece
        offset, end = 0, len(data)
        while end - offset >= 5:
            flags, length = _GRPC_WEB_FRAME.unpack_from(data, offset)
            if end - offset - 5 < length:
                break
            message = data[offset + 5 : offset + 5 + length]
            offset += 5 + length
            if flags & 0x80:
                for line in message.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name:
                        self.trailers[name.strip().lower()] = value.strip()
                continue
            event = pb.ChatResponse.FromString(message)
            kind = event.WhichOneof("event")
            if kind == "chunk":
                self.sample.received_ns.append(arrived_ns)
                self.sample.sent_ns.append(parse_stamp(event.chunk.text))
                self.text.append(event.chunk.text)
            elif kind == "response_done":
                self.final = event.response_done.text
        self._pending = data[offset:]


class GrpcWebTurns:
    """`Chat` over gRPC-Web, binary (`application/grpc-web+proto`, what grpc-dart's web channel
    sends), against `serve --http`'s listener at `address`."""

    def __init__(self, address: str, streams: int) -> None:
        self._pool = _Http1Pool(address, streams)

    async def prepare(self, users: list[str]) -> None:
        await self._pool.open()

    async def turn(self, index: int, user: str, message: str) -> TurnSample:
        sample = TurnSample(time.monotonic_ns())
        payload = pb.ChatRequest(message=message, user=user).SerializeToString()
        body = _GRPC_WEB_FRAME.pack(0, len(payload)) + payload
        head = self._pool.request_head(
            GRPC_WEB_CHAT_PATH, "application/grpc-web+proto", len(body), "X-Grpc-Web: 1\r\n"
        )
        reader = _GrpcWebChat(sample)
        connection = await self._pool.exchange_for(sample, index, head + body, reader.feed)
        if connection is None:
            return sample
        if connection.status != 200:
            sample.error = f"HTTP_{connection.status}"
            return sample
        trailers = reader.trailers or {  # trailers-only: the status in the headers
            k.decode("latin-1"): v.decode("latin-1") for k, v in connection.headers.items()
        }
        code = int(trailers.get("grpc-status", "2"))
        if code != 0:
            sample.error = _STATUS_NAMES.get(code, f"GRPC_{code}")
            sample.detail = trailers.get("grpc-message", "")
        elif reader.final is None or reader.final != "".join(reader.text):
            sample.error = "TRUNCATED"
        return sample

    async def close(self) -> None:
        await self._pool.close()


class _SeedChat:
    """Reads the seeds' SSE: `event:` and one `data:` line an event, events apart by a blank line
    (the listener writes LF line ends); `: ping` comments are skipped."""

    def __init__(self, sample: TurnSample) -> None:
        self.sample = sample
        self.text: list[str] = []
        self.final: str | None = None
        self.done = False
        self.error: dict[str, Any] | None = None
        self._pending = b""

    @property
    def rest(self) -> bytes:
        """What no blank line ended: the whole body of a refusal (one line of JSON)."""
        return self._pending

    def feed(self, piece: bytes, arrived_ns: int) -> None:
        data = self._pending + piece if self._pending else piece
        start = 0
        while (end := data.find(b"\n\n", start)) >= 0:
            self._event(data[start:end], arrived_ns)
            start = end + 2
        self._pending = data[start:]

    def _event(self, block: bytes, arrived_ns: int) -> None:
        name, payload = b"message", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                payload = line[5:].removeprefix(b" ")
        if name == b"chunk":
            text: str = json.loads(payload)["text"]
            self.sample.received_ns.append(arrived_ns)
            self.sample.sent_ns.append(parse_stamp(text))
            self.text.append(text)
        elif name == b"response_done":
            self.final = json.loads(payload)["response"]["text"]
        elif name == b"done":
            self.done = True
        elif name == b"error":
            self.error = json.loads(payload)


class SeedSseTurns:
    """`Chat` through the seeds' contract (`POST /functions/v1/health-agent`, `stream: true`),
    read as Server-Sent Events, against `serve --http`'s listener at `address`."""

    def __init__(self, address: str, streams: int) -> None:
        self._pool = _Http1Pool(address, streams)

    async def prepare(self, users: list[str]) -> None:
        await self._pool.open()

    async def turn(self, index: int, user: str, message: str) -> TurnSample:
        sample = TurnSample(time.monotonic_ns())
        body = json.dumps({"message": message, "user": user, "stream": True}).encode()
        head = self._pool.request_head(
            SEED_PATH, "application/json", len(body), "Accept: text/event-stream\r\n"
        )
        reader = _SeedChat(sample)
        connection = await self._pool.exchange_for(sample, index, head + body, reader.feed)
        if connection is None:
            return sample
        if connection.status != 200:
            try:
                refused = json.loads(reader.rest)
                sample.error = str(refused.get("code") or f"HTTP_{connection.status}")
                sample.detail = str(refused.get("error", ""))
            except ValueError:
                sample.error = f"HTTP_{connection.status}"
            return sample
        if reader.error is not None:
            sample.error = str(reader.error.get("code", "ERROR"))
            sample.detail = str(reader.error.get("message", ""))
        elif not reader.done or reader.final is None or reader.final != "".join(reader.text):
            sample.error = "TRUNCATED"
        return sample

    async def close(self) -> None:
        await self._pool.close()
