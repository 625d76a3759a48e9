"""gRPC-Web (binary and text) in front of the gRPC server, for browsers and Flutter web.

Each call is forwarded, bytes in and bytes out, to this process's own gRPC server over its
private socket (`forwarding.py`; an abstract Unix socket on Linux), so authentication,
validation, limits, history, metrics and the `google.rpc` error details stay the one code path
that exists (grpc/grpc `doc/PROTOCOL-WEB.md`):

- the request body is one 5-byte-framed message (base64 of it in text mode);
- headers become gRPC metadata, `grpc-timeout` the call's deadline;
- a server stream is sent frame by frame as it arrives, then a trailers frame (flag 0x80) with
  lower-case `grpc-status`, `grpc-message` and `grpc-status-details-bin`; a call that fails
  before its first message answers "trailers-only": the status in the HTTP headers;
- a browser that goes away (the connection closes) cancels the call, which closes the upstream
  request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote

import grpc
import structlog
from grpc_health.v1 import health_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.api.status import to_status
from healthagent_service.errors import FieldViolation, invalid_argument
from healthagent_service.web.forwarding import ForwardedCall, ForwardingChannel, Metadata

log = structlog.get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BINARY = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"
_CONTENT_TYPES = {
    "application/grpc-web": BINARY,
    BINARY: BINARY,
    TEXT: TEXT,
    "application/grpc-web-text+proto": TEXT,
}
_TRAILERS_FLAG = 0x80
_FRAME_HEADER = struct.Struct(">BI")
# headers that are HTTP's or gRPC-Web's own, never forwarded as call metadata
_NOT_METADATA = frozenset(
    {
        "host",
        "connection",
        "content-type",
        "content-length",
        "accept",
        "accept-encoding",
        "accept-language",
        "origin",
        "referer",
        "user-agent",
        "cookie",
        "te",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "grpc-accept-encoding",
        "grpc-encoding",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "priority",
    }
)
_METADATA_NAME = re.compile(r"^[0-9a-z_.-]+$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")
_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def served_paths() -> frozenset[str]:
    """Every HealthAgent RPC, and the health check (for probes through the same port), by
    path: unary and server-streaming calls are forwarded alike."""
    return frozenset(
        f"/{service.full_name}/{method.name}"
        for service in (
            pb.DESCRIPTOR.services_by_name["HealthAgent"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        )
        for method in service.methods
        if not method.client_streaming  # gRPC-Web has no client streaming; this API has none
    )


class BadWebRequest(Exception):  # noqa: N818 - the client's fault, answered as a status
    """A request that is not a well-formed gRPC-Web call."""


def parse_timeout(value: str | None) -> float | None:
    """`grpc-timeout` (e.g. `1500m`) in seconds."""
    if not value:
        return None
    match = _TIMEOUT.match(value)
    if match is None:
        raise BadWebRequest(f"grpc-timeout {value!r} is not an integer and a unit (H M S m u n)")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def decode_request(body: bytes, text: bool) -> bytes:
    """The one message of a unary request body."""
    if text:
        try:
            body = _decode_text(body)
        except (binascii.Error, ValueError):
            raise BadWebRequest("the body is not base64 (application/grpc-web-text)") from None
    if len(body) < _FRAME_HEADER.size:
        raise BadWebRequest("the body holds no gRPC-Web frame")
    flags, length = _FRAME_HEADER.unpack_from(body)
    if flags & 0x01:
        raise BadWebRequest("compressed frames are not accepted")
    if flags != 0 or len(body) != _FRAME_HEADER.size + length:
        raise BadWebRequest("the body must be exactly one uncompressed message frame")
    return body[_FRAME_HEADER.size :]


def _decode_text(body: bytes) -> bytes:
    # possibly several padded base64 pieces back to back: decode 4-character groups
    compact = b"".join(body.split())
    decoded = bytearray()
    start = 0
    while start < len(compact):
        end = compact.find(b"=", start)
        if end == -1:
            end = len(compact)
        else:
            while end < len(compact) and compact[end : end + 1] == b"=":
                end += 1
        decoded += base64.b64decode(compact[start:end], validate=True)
        start = end
    return bytes(decoded)


def frame(message: bytes) -> bytes:
    return _FRAME_HEADER.pack(0, len(message)) + message


def _header_value(value: str | bytes) -> str:
    return base64.b64encode(value).decode() if isinstance(value, bytes) else value


def status_headers(
    code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str | bytes], ...]
) -> list[tuple[str, str]]:
    """The status and trailing metadata as lower-case header pairs (binary values base64)."""
    headers = [("grpc-status", str(code.value[0]))]
    if message:
        # percent-encoded, as the gRPC spec says of grpc-message
        headers.append(("grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
    for key, value in trailing:
        if key.startswith(":") or key in {"grpc-status", "grpc-message"}:
            continue
        headers.append((key.lower(), _header_value(value)))
    return headers


def trailers_frame(headers: list[tuple[str, str]]) -> bytes:
    block = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
    return _FRAME_HEADER.pack(_TRAILERS_FLAG, len(block)) + block


def call_metadata(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str | bytes]]:
    """The request headers that are call metadata (`-bin` ones base64-decoded)."""
    metadata: list[tuple[str, str | bytes]] = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in _NOT_METADATA or name.startswith(("sec-", ":", "access-control-")):
            continue
        if not _METADATA_NAME.match(name) or name.startswith("grpc-"):
            continue
        value = raw_value.decode("latin-1")
        if not name.endswith("-bin") and not _PRINTABLE_ASCII.match(value):
            raise BadWebRequest(f"header {name} must be printable ASCII, as gRPC metadata is")
        if name.endswith("-bin"):
            try:
                metadata.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
            except (binascii.Error, ValueError):
                raise BadWebRequest(f"metadata {name} is not base64") from None
        else:
            metadata.append((name, value))
    return metadata


class GrpcWebBridge:
    """Serves gRPC-Web calls by forwarding them to `channel` (this process's gRPC server)."""

    def __init__(self, channel: ForwardingChannel, max_request_bytes: int) -> None:
        self._channel = channel
        self._paths = served_paths()
        self._max_request_bytes = max_request_bytes

    def serves(self, path: str) -> bool:
        return path in self._paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        content_type = _CONTENT_TYPES.get(
            dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").split(";")[0]
        )
        if scope["method"] != "POST" or content_type is None:
            await _plain(send, 415, "gRPC-Web calls are POSTs of application/grpc-web(-text)")
            return
        text = content_type == TEXT
        reply = _Reply(send, content_type, text)
        try:
            body = await _read_body(receive, self._max_request_bytes * 2 + 64)
            request = decode_request(body, text)
            metadata = call_metadata(scope["headers"])
            timeout = parse_timeout(dict(scope["headers"]).get(b"grpc-timeout", b"").decode())
        except BadWebRequest as exc:
            await reply.fail(_bad_request(str(exc)))
            return
        # bytes in, bytes out: a unary call is one message, then the status
        call = await self._channel.call(path, request, metadata, timeout)
        # the browser leaving is a disconnect on `receive`: cancel the call, closing upstream
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, call))
        try:
            while (message := await call.read()) is not None:
                await reply.message(message, call.initial_metadata())
            await reply.finish(grpc.StatusCode.OK, "", call.trailing_metadata())
        except grpc.aio.AioRpcError as error:
            await reply.finish(
                error.code(), error.details() or "", tuple(error.trailing_metadata())
            )
        except (OSError, asyncio.CancelledError):
            call.cancel()  # the browser went away: the call ends with it, quietly
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _bad_request(
    description: str,
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    status = to_status(invalid_argument([FieldViolation("request", description)]))
    return status.code, status.details, tuple(status.trailing_metadata)


async def _read_body(receive: Receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadWebRequest("the client left before sending its request")
        body += message.get("body", b"")
        if len(body) > limit:
            raise BadWebRequest(f"the request is larger than {limit} bytes")
        if not message.get("more_body"):
            return bytes(body)


async def _cancel_on_disconnect(receive: Receive, call: ForwardedCall) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    call.cancel()


async def _plain(send: Send, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


class _Reply:
    """One call's HTTP response: headers on the first message, then frames, then trailers."""

    def __init__(self, send: Send, content_type: str, text: bool) -> None:
        self._send = send
        self._content_type = content_type
        self._text = text
        self._started = False

    async def _start(self, extra: list[tuple[str, str]]) -> None:
        headers = [
            (b"content-type", self._content_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        headers += [(name.encode(), value.encode("latin-1", "replace")) for name, value in extra]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        self._started = True

    async def _body(self, data: bytes, *, more: bool) -> None:
        if self._text:
            data = base64.b64encode(data)
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def message(self, message: bytes, initial: Metadata) -> None:
        if not self._started:  # the call's initial metadata: headers go once
            await self._start([(k.lower(), _header_value(v)) for k, v in initial])
        await self._body(frame(message), more=True)

    async def finish(
        self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        headers = status_headers(code, message, trailing)
        if not self._started:
            # trailers-only: the status in the HTTP headers, and an empty body
            await self._start(headers)
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._body(trailers_frame(headers), more=False)

    async def fail(
        self, status: tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]
    ) -> None:
        await self.finish(*status)
