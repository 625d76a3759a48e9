"""Clients of the HTTP listener for the tests, written from the specs, not from the server's code:
gRPC-Web (grpc/grpc doc/PROTOCOL-WEB.md) and the seeds' SSE (WHATWG event streams)."""

from __future__ import annotations

import base64
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

BINARY = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"


@dataclass
class WebReply:
    """A gRPC-Web answer: HTTP status and headers, messages, trailers (from the trailers frame,
    or from the headers of a trailers-only answer) and when each message arrived."""

    http_status: int
    headers: httpx.Headers
    messages: list[bytes] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)
    ended_at: float = 0.0

    @property
    def grpc_status(self) -> int:
        return int(self.trailers["grpc-status"])

    def status(self) -> status_pb2.Status:
        return status_pb2.Status.FromString(
            base64.b64decode(self.trailers["grpc-status-details-bin"] + "==")
        )

    def reason(self) -> str:
        for detail in self.status().details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
        raise AssertionError("no ErrorInfo")

    def violations(self) -> list[tuple[str, str]]:
        for detail in self.status().details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                return [(v.field, v.description) for v in bad.field_violations]
        return []


def _frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Whole frames taken off the front of `buffer`."""
    frames = []
    while len(buffer) >= 5:
        flags, length = struct.unpack(">BI", buffer[:5])
        if len(buffer) < 5 + length:
            break
        frames.append((flags, bytes(buffer[5 : 5 + length])))
        del buffer[: 5 + length]
    return frames


async def grpc_web(
    client: httpx.AsyncClient,
    base_url: str,
    method: str,
    request: Message | bytes,
    *,
    text: bool = False,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> WebReply:
    """Call `method` (`Service/Method`) over gRPC-Web; `stop_after` messages closes early."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    body = struct.pack(">BI", 0, len(payload)) + payload
    if text:
        body = base64.b64encode(body)
    sent_headers = {
        "content-type": TEXT if text else BINARY,
        "x-grpc-web": "1",
        "x-user-agent": "grpc-web-test/0.1",
        **(headers or {}),
    }
    async with client.stream(
        "POST", f"{base_url}/{method}", content=body, headers=sent_headers
    ) as response:
        reply = WebReply(response.status_code, response.headers)
        raw = bytearray()
        pending_text = b""
        async for piece in response.aiter_raw():
            if text:
                pending_text += piece
                whole = len(pending_text) - len(pending_text) % 4
                raw += base64.b64decode(pending_text[:whole])
                pending_text = pending_text[whole:]
            else:
                raw += piece
            for flags, data in _frames(raw):
                if flags & 0x80:
                    for line in data.decode().split("\r\n"):
                        if line:
                            name, _, value = line.partition(":")
                            assert name == name.lower(), f"trailer {name!r} is not lower case"
                            reply.trailers[name] = value.strip()
                else:
                    reply.messages.append(data)
                    reply.arrivals.append(time.monotonic())
            if stop_after is not None and len(reply.messages) >= stop_after:
                break
        reply.ended_at = time.monotonic()
    if not reply.trailers and "grpc-status" in response.headers:  # trailers-only
        reply.trailers = {k: v for k, v in response.headers.items() if k.startswith("grpc-")}
    return reply


@dataclass
class SseEvent:
    name: str
    data: Any
    event_id: str = ""


async def sse(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    stop_after: int | None = None,
) -> tuple[httpx.Response, list[SseEvent], list[str]]:
    """POST `body` and read the event stream: (response, events, comment lines); with
    `stop_after`, hang up once that many events came."""
    events: list[SseEvent] = []
    comments: list[str] = []
    async with client.stream("POST", url, json=body, headers=headers or {}) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
            return response, events, comments
        name, data, event_id = "message", "", ""
        async for line in response.aiter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line == "" and data:
                events.append(SseEvent(name, json.loads(data), event_id))
                name, data, event_id = "message", "", ""
                if len(events) == stop_after:
                    break
    return response, events, comments
