"""The HTTP listener's gRPC client: each HTTP call becomes an ordinary gRPC call to this
process's own gRPC server, over its private socket (HTTP/2, `grpc-timeout`, RST_STREAM on
cancel, the server's status and trailing metadata as it sent them).

`h2` keeps the protocol: settings, pings, headers and trailers, resets, the request's flow
control. The DATA frames of open responses are read here, straight into their call's buffer:
every forwarded chunk is one, and reading it was most of what the hop added to a chunk.
grpc.aio's client spent a completion-queue event, a hop through gRPC's poller thread and a
future on each, `h2`'s frame state machine 41 us; read here, a frame costs about 3 us
(docs/decisions/0008-http-listener-loopback-hop.md). GOAWAY is read here too: `h2` closes the
whole connection on it, where the streams the server took must run to their ends.

Flow control is each call's backpressure. A response's bytes are credited back to the server as
they arrive while less than `HIGH_WATER` of whole messages waits to be read, and only as they
are read beyond that: a slow HTTP client stalls the server's writes (where the service's stall
limit applies) instead of filling memory here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import math
import struct
from collections.abc import Iterable, Sequence
from typing import cast
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog

from healthagent_service.listen import parse_listen

log = structlog.get_logger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]

STREAM_WINDOW = 1024 * 1024  # announced for each response stream
CONNECTION_WINDOW = 1 << 30
CREDIT_BATCH = 32 * 1024  # credit goes back in WINDOW_UPDATEs of at least this
HIGH_WATER = 256 * 1024  # unread whole messages beyond this hold the credit back
_REFUSED_RETRIES = 2  # a call the server never took (GOAWAY, REFUSED_STREAM) goes again

_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits, split), type, flags, stream id
_MESSAGE_HEADER = struct.Struct(">BI")
_WINDOW_UPDATE = struct.Struct(">HBBBLL")
_STREAM_ID = struct.Struct(">L")
_DATA, _GOAWAY, _WINDOW_UPDATE_TYPE = 0x0, 0x7, 0x8
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# headers that are HTTP/2's or gRPC's own, not call metadata (as grpc.aio leaves them out)
_NOT_METADATA = frozenset(
    {"content-type", "grpc-status", "grpc-message", "grpc-encoding", "grpc-accept-encoding", "te"}
)
# RST_STREAM codes as gRPC statuses (gRPC's PROTOCOL-HTTP2.md); the rest are INTERNAL
_RESET_CODES: dict[int, grpc.StatusCode] = {
    h2.errors.ErrorCodes.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: grpc.StatusCode.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: grpc.StatusCode.PERMISSION_DENIED,
}


def grpc_timeout(seconds: float) -> str:
    """A deadline as `grpc-timeout`: at most 8 digits and a unit, rounded up."""
    for unit, per_second in (("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = max(1, math.ceil(seconds * per_second))
        if value < 100_000_000:
            return f"{value}{unit}"
    return "99999999H"


def _metadata(headers: Iterable[tuple[str, str]]) -> Metadata:
    pairs: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if name.startswith(":") or name in _NOT_METADATA:
            continue
        if name.endswith("-bin"):
            try:
                pairs.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
            except ValueError:  # not base64 after all: passed on as it came
                pairs.append((name, value))
        else:
            pairs.append((name, value))
    return tuple(pairs)


def _text(headers: Iterable[tuple[str | bytes, str | bytes]] | None) -> list[tuple[str, str]]:
    """h2's headers (decoded already: `header_encoding`) as plain pairs."""
    return [(str(name), str(value)) for name, value in headers or ()]


def _error(
    code: grpc.StatusCode, details: str, initial: Metadata = (), trailing: Metadata = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(*initial), grpc.aio.Metadata(*trailing), details
    )


class ForwardedCall:
    """One call: the request goes whole; response messages are read with `read`."""

    def __init__(
        self,
        channel: ForwardingChannel,
        headers: list[tuple[str, str]],
        body: bytes,
        max_message_bytes: int,
    ) -> None:
        self._channel = channel
        self.request_headers = headers
        self.request_body = body
        self._max_message_bytes = max_message_bytes
        self.connection: _Connection | None = None
        self.stream_id = 0
        self.attempts = 0
        self.responded = False  # response headers came: the server took the call
        self._buffer = bytearray()
        self._messages: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes of whole messages not yet read
        self._uncredited = 0  # bytes received and not yet credited back
        self._waiter: asyncio.Future[None] | None = None
        self._initial: Metadata = ()
        self._trailing: Metadata = ()
        self._error: grpc.aio.AioRpcError | None = None
        self._status_headers: list[tuple[str, str]] = []
        self.ended = False
        self._timer: asyncio.TimerHandle | None = None

    # what the HTTP side uses

    async def read(self) -> bytes | None:
        """The next response message; None once the call ended OK. Raises `AioRpcError` with
        the call's status when it ended otherwise."""
        while not self._messages:
            if self.ended:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        self._queued -= _MESSAGE_HEADER.size + len(message)
        self._give_credit()
        return message

    def initial_metadata(self) -> Metadata:
        """The response headers' metadata (known once `read` returned or raised)."""
        return self._initial

    def trailing_metadata(self) -> Metadata:
        """The trailers' metadata (known once `read` returned None or raised)."""
        return self._trailing

    def cancel(self) -> None:
        """End the call at once (RST_STREAM CANCEL): the server's handler is cancelled."""
        self._abort(grpc.StatusCode.CANCELLED, "Cancelled")

    def set_deadline(self, seconds: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            seconds, self._abort, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        )

    def _abort(self, code: grpc.StatusCode, details: str) -> None:
        if not self.ended:
            if self.connection is not None and self.stream_id:
                self.connection.reset(self.stream_id)
            self.finish(_error(code, details, self._initial))

    # what the connection uses

    def on_headers(self, headers: list[tuple[str, str]]) -> None:
        self.responded = True
        self._status_headers = headers  # a trailers-only answer's status is here
        self._initial = _metadata(headers)

    def on_trailers(self, headers: list[tuple[str, str]]) -> None:
        self._status_headers = headers

    def on_data(self, payload: bytes | memoryview, *, credited: bool = False) -> None:
        """Response bytes; `credited`: h2 saw them and credits them back itself."""
        if not credited:
            self._uncredited += len(payload)
        buffer = self._buffer
        buffer += payload
        while len(buffer) >= _MESSAGE_HEADER.size:
            flags, length = _MESSAGE_HEADER.unpack_from(buffer)
            if length > self._max_message_bytes:
                self._abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a response message of {length} bytes is over the limit "
                    f"({self._max_message_bytes})",
                )
                return
            if flags & 0x01:
                self._abort(grpc.StatusCode.INTERNAL, "a compressed message, never asked for")
                return
            end = _MESSAGE_HEADER.size + length
            if len(buffer) < end:
                break
            self._messages.append(bytes(buffer[_MESSAGE_HEADER.size : end]))
            self._queued += end
            del buffer[:end]
        self._give_credit()
        self._wake()

    def on_end(self) -> None:
        """The server ended the stream: the status is in the trailers (or the only headers)."""
        if self.ended:
            return
        status = dict(self._status_headers)
        trailing = _metadata(self._status_headers)
        raw_code = status.get("grpc-status")
        error: grpc.aio.AioRpcError | None
        if raw_code is None or not raw_code.isdigit():
            error = _error(grpc.StatusCode.UNKNOWN, "the server sent no grpc-status", self._initial)
        elif self._buffer:
            error = _error(grpc.StatusCode.INTERNAL, "the response ended inside a message")
        else:
            code = _CODES.get(int(raw_code), grpc.StatusCode.UNKNOWN)
            details = unquote(status.get("grpc-message", ""))
            error = (
                None
                if code is grpc.StatusCode.OK
                else _error(code, details, self._initial, trailing)
            )
        self._trailing = trailing
        self.finish(error)

    def on_reset(self, error_code: int) -> None:
        if error_code == h2.errors.ErrorCodes.REFUSED_STREAM and self._channel.retry(self):
            return
        code = _RESET_CODES.get(error_code, grpc.StatusCode.INTERNAL)
        self.finish(_error(code, f"the gRPC server reset the stream ({error_code})", self._initial))

    def on_connection_gone(self, refused: bool) -> None:
        """The connection closed under the call; `refused`: the server never took it (GOAWAY
        named an earlier stream as its last), so it may go again."""
        if refused and not self.responded and self._channel.retry(self):
            return
        self.finish(
            _error(
                grpc.StatusCode.UNAVAILABLE,
                "the connection to the gRPC server closed",
                self._initial,
            )
        )

    def restart(self) -> None:
        """Back to before the first attempt (the server never saw this one)."""
        self.connection = None
        self.stream_id = 0

    def finish(self, error: grpc.aio.AioRpcError | None) -> None:
        if self.ended:
            return
        self.ended = True
        self._error = error
        if self._timer is not None:
            self._timer.cancel()
        if self.connection is not None:
            self.connection.forget(self.stream_id)
        self._wake()

    def _give_credit(self) -> None:
        if (
            self._uncredited >= CREDIT_BATCH
            and self._queued < HIGH_WATER
            and not self.ended
            and self.connection is not None
        ):
            self.connection.credit(self.stream_id, self._uncredited)
            self._uncredited = 0

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to the gRPC server."""

    def __init__(self, channel: ForwardingChannel) -> None:
        self._channel = channel
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._calls: dict[int, ForwardedCall] = {}
        self._transport: asyncio.Transport | None = None
        self._pending = b""  # the start of a frame not yet whole
        self._uncredited = 0  # connection-level bytes received and not yet credited back
        self._window_opened: asyncio.Future[None] | None = None
        self.usable = True  # false after GOAWAY or once closed: new calls go elsewhere
        self._closing = False  # closed by this side: what still arrives is dropped
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._h2.initiate_connection()
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        self._h2.increment_flow_control_window(CONNECTION_WINDOW)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.on_connection_gone(refused=False)
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_senders()

    def data_received(self, data: bytes) -> None:
        if self._pending:
            data = self._pending + data
        view = memoryview(data)
        size = len(data)
        position = run_start = 0
        try:
            while size - position >= 9 and not self._closing:
                high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(data, position)
                end = position + 9 + ((high << 8) | low)
                if end > size:
                    break
                if (kind == _DATA and not flags) or kind == _GOAWAY:
                    if run_start < position:  # the frames before it first, in order
                        self._to_h2(data[run_start:position])
                    run_start = end
                    if kind == _DATA:  # a chunk of a response: the hot path, past h2
                        call = self._calls.get(stream_id & 0x7FFFFFFF)
                        self._uncredited += end - position - 9
                        if call is not None:
                            call.on_data(view[position + 9 : end])
                    else:
                        # kept from h2, which closes the whole connection on GOAWAY, where
                        # the streams the server took must go on to their ends
                        (last_stream_id,) = _STREAM_ID.unpack_from(data, position + 9)
                        self._goaway(last_stream_id & 0x7FFFFFFF)
                position = end
            if run_start < position:
                self._to_h2(data[run_start:position])
        except h2.exceptions.ProtocolError as error:
            log.error("the gRPC server broke HTTP/2 on the private socket", error=str(error))
            self.close()
            return
        self._pending = bytes(view[position:])
        if self._uncredited >= CONNECTION_WINDOW // 2:
            self.credit(0, self._uncredited)
            self._uncredited = 0

    def _to_h2(self, frames: bytes) -> None:
        for event in self._h2.receive_data(frames):
            if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._wake_senders()
                continue
            if isinstance(event, h2.events.DataReceived):  # one h2 had to see (END_STREAM)
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self._calls.get(getattr(event, "stream_id", 0) or 0)
            if call is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                call.on_headers(_text(event.headers))
            elif isinstance(event, h2.events.TrailersReceived):
                call.on_trailers(_text(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                call.on_data(event.data, credited=True)
            elif isinstance(event, h2.events.StreamEnded):
                call.on_end()
            elif isinstance(event, h2.events.StreamReset):
                self._calls.pop(event.stream_id, None)
                call.on_reset(event.error_code)
        self._flush()

    def _goaway(self, last_stream_id: int) -> None:
        """The server is closing: calls it took go on; the ones after `last_stream_id` it
        never saw, and go again on another connection."""
        self.usable = False
        for stream_id in [s for s in self._calls if s > last_stream_id]:
            self._calls.pop(stream_id).on_connection_gone(refused=True)
        self._close_if_drained()

    async def start(self, call: ForwardedCall) -> None:
        """Send the call's headers and request on this connection."""
        if call.ended:  # cancelled, or out of time, while connecting
            return
        stream_id = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(stream_id, call.request_headers)
        except h2.exceptions.ProtocolError:  # metadata HTTP/2 cannot carry
            # not h2's words: they quote the value, which may be the caller's credential
            call.finish(
                _error(grpc.StatusCode.INVALID_ARGUMENT, "request metadata HTTP/2 cannot carry")
            )
            # h2 may have changed its HPACK table for headers it never sent: no more HEADERS
            # on this connection (the calls on it go on; nothing of theirs needs HPACK)
            self.usable = False
            self._close_if_drained()
            return
        call.connection, call.stream_id = self, stream_id
        self._calls[stream_id] = call
        body = memoryview(call.request_body)
        while True:
            window = min(
                self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
            )
            if window <= 0 and body:
                self._flush()
                await self._window_open()
                if call.ended or call.connection is not self:
                    return
                continue
            piece, body = body[:window], body[window:]
            self._h2.send_data(stream_id, bytes(piece), end_stream=not body)
            if not body:
                break
        self._flush()

    async def _window_open(self) -> None:
        if self._window_opened is None:
            self._window_opened = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._window_opened)

    def _wake_senders(self) -> None:
        opened, self._window_opened = self._window_opened, None
        if opened is not None and not opened.done():
            opened.set_result(None)

    def credit(self, stream_id: int, amount: int) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(
                _WINDOW_UPDATE.pack(0, 4, _WINDOW_UPDATE_TYPE, 0, stream_id, amount)
            )

    def reset(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()
        self._close_if_drained()

    def forget(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if not self.usable and not self._calls:
            self.close()

    def close(self) -> None:
        self.usable = False
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.close_connection()
                self._flush()
            self._transport.close()

    def _flush(self) -> None:
        out = self._h2.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)


class ForwardingChannel:
    """Calls to the gRPC server at `target` (`unix-abstract:NAME` or `HOST:PORT`) over one
    HTTP/2 connection at a time (a new one after the server's GOAWAY)."""

    def __init__(
        self, target: str, *, max_message_bytes: int, authority: str = "localhost"
    ) -> None:
        self._target = target
        self._authority = authority
        self._max_message_bytes = max_message_bytes
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._draining: set[_Connection] = set()
        self._retrying: set[asyncio.Task[None]] = set()
        self._closed = False

    async def call(
        self,
        path: str,
        request: bytes,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,
    ) -> ForwardedCall:
        """Start a call; its failures, failing to connect included, come from its `read`."""
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", self._authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", "healthagent-http-listener"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", grpc_timeout(timeout)))
        for name, value in metadata:
            text = (
                base64.b64encode(value).rstrip(b"=").decode() if isinstance(value, bytes) else value
            )
            headers.append((name, text))
        body = _MESSAGE_HEADER.pack(0, len(request)) + request
        call = ForwardedCall(self, headers, body, self._max_message_bytes)
        if timeout is not None:
            call.set_deadline(timeout)
        await self._start(call)
        return call

    async def unary(
        self,
        path: str,
        request: bytes,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,
    ) -> bytes:
        """A unary call's one response message. Raises `AioRpcError`."""
        call = await self.call(path, request, metadata, timeout)
        try:
            response = await call.read()
            if response is None:
                raise _error(grpc.StatusCode.UNKNOWN, "the server sent no response message")
            while await call.read() is not None:
                pass  # one message: the status decides, as in grpc's own client
            return response
        finally:
            call.cancel()

    def retry(self, call: ForwardedCall) -> bool:
        """Start `call` again on another connection, when it has tries left."""
        if call.attempts > _REFUSED_RETRIES or self._closed or call.ended:
            return False
        call.restart()
        task = asyncio.get_running_loop().create_task(self._start(call))
        self._retrying.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._retrying.discard)
        return True

    async def _start(self, call: ForwardedCall) -> None:
        call.attempts += 1
        try:
            connection = await self._usable_connection()
            await connection.start(call)
        except (OSError, h2.exceptions.H2Error) as error:
            call.finish(
                _error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the gRPC server's private socket is not reachable: {error}",
                )
            )

    async def _usable_connection(self) -> _Connection:
        if self._closed:
            raise OSError("the HTTP listener is stopping")
        if self._connection is not None and self._connection.usable:
            return self._connection
        async with self._connecting:
            if self._connection is not None and self._connection.usable:
                return self._connection
            old = self._connection
            if old is not None:
                self._draining.add(old)
                old.closed.add_done_callback(lambda _: self._draining.discard(old))
            loop = asyncio.get_running_loop()
            if self._target.startswith("unix-abstract:"):
                path = "\0" + self._target.removeprefix("unix-abstract:")
                _, connection = await loop.create_unix_connection(
                    lambda: _Connection(self), path=path
                )
            else:
                host, port = parse_listen(self._target)
                _, connection = await loop.create_connection(lambda: _Connection(self), host, port)
            self._connection = connection
            return connection

    async def close(self) -> None:
        """Close every connection: calls still open end UNAVAILABLE."""
        self._closed = True
        connections = [c for c in (self._connection, *self._draining) if c is not None]
        for connection in connections:
            connection.close()
        for connection in connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(connection.closed), 1.0)
