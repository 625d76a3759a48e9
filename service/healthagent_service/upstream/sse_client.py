"""An HTTP/1.1 client for one job: POST a turn and read back its Server-Sent Events.

This is the per-chunk hot path. Through httpx each SSE event crossed httpx's byte iterator,
httpcore's connection and pool streams, h11's state machine and chunked reader and a network
read: about a third of the event loop's time per relayed chunk, more than the gRPC write itself
(docs/decisions/0001-sse-client.md). Here one asyncio protocol per connection feeds the socket's
bytes to llhttp (`httptools`, C, the parser Node.js and uvicorn use), whose body callback feeds
the SSE decoder, so complete events queue up as they arrive; the reader takes every queued event
in one wake-up. Requests are serialized by hand (the headers are the service's own).

httpx still makes every other upstream call (minting, cancelling, Realtime secrets, JWKS), and
this client raises httpx's exception types, so the error mapping is one and the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

from healthagent_service.upstream.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    SSEDecoder,
    SSEProtocolError,
)
from healthagent_service.watchdog import NOT_ARMED, Deadline, Watchdog

# queued event bytes above which the socket stops being read, until the reader takes the queue
_HIGH_WATER = 256 * 1024
_MAX_BODY_BYTES = 64 * 1024  # of a response that is not an event stream (an error's body)
# What a stream may hold for upstream events without counting against the budget shared by all
# streams: far above what a turn's events take (a few hundred bytes each), so only a stream fed
# large events counts. A bad upstream could otherwise make every stream hold an 8 MiB event.
FREE_BUFFER_BYTES = 64 * 1024
DEFAULT_MAX_BUFFERED_BYTES = 128 * 1024 * 1024
# Below the 5 s keep-alive timeout of common servers (uvicorn, nginx's default is 75 s), so
# this side closes an idle connection before the peer can close it under a new request.
KEEPALIVE_EXPIRY_SECONDS = 4.0
_RECEIVE_BUFFER_BYTES = 64 * 1024  # at most this much per socket read
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before trying the next address, as RFC 8305 suggests


class _ReceiveBuffer(threading.local):
    """One receive buffer per thread (an event loop runs in one thread), shared by its
    connections: asyncio calls `get_buffer` and `buffer_updated` back to back, so no two
    reads ever overlap in it. (asyncio's plain `Protocol` receives into a fresh 256 KiB bytes
    object per read instead, which under streaming load fragmented the malloc heap:
    docs/reliability.md.)"""

    def __init__(self) -> None:
        self.memory = memoryview(bytearray(_RECEIVE_BUFFER_BYTES))


_receive_buffer = _ReceiveBuffer()


def receive_buffer() -> memoryview:
    """This thread's receive buffer, for buffered protocols (see `_ReceiveBuffer`)."""
    return _receive_buffer.memory


class BufferBudgetExceededError(Exception):
    """The streams together hold more upstream event bytes than allowed: this one, which was
    growing, is ended."""


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    tls: bool


class SSEResponse:
    """The response to one request: status and headers, then its events (status 200) or its
    body (anything else)."""

    __slots__ = ("_connection", "receive_events")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        # The data of every complete event that has arrived, waiting for at least one; an
        # empty list once the body has ended. Raises httpx's `ReadTimeout`, `ReadError` or
        # `RemoteProtocolError`, or `SSEProtocolError`. (The connection's own method: one
        # call less per chunk.)
        self.receive_events = connection.receive_events

    @property
    def status_code(self) -> int:
        return self._connection.status

    @property
    def headers(self) -> httpx.Headers:
        return httpx.Headers(self._connection.headers)

    @property
    def ended_inside_event(self) -> bool:
        """True when the body ended with an event begun but not finished."""
        return self._connection.decoder.has_partial_event

    async def read_capped(self, limit: int) -> bytes:
        """The body (not an event stream), at most `limit` bytes of it."""
        return await self._connection.read_body(limit)


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection and the response currently being read on it."""

    def __init__(self, client: SSEClient, origin: _Origin) -> None:
        self._client = client
        self._loop = client.loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self._read_timeout = client.read_timeout
        self._watchdog = client.watchdog
        self._deadline = Deadline(self._timed_out)  # watched while a request is in flight
        self._max_event_bytes = client.max_event_bytes
        self._held = 0  # bytes over FREE_BUFFER_BYTES counted in the client's `buffered`
        self._begin_response()

    def _begin_response(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.decoder = SSEDecoder(self._max_event_bytes)
        self._headers_done = False
        self._streaming = False  # status 200: the body is decoded as events
        self._body = bytearray()  # any other status: the body is kept, up to _MAX_BODY_BYTES
        self._notify = False  # something a reader waits for has arrived
        self._events: list[bytes] = []  # handed over whole, a new list put in its place
        self._queued = 0
        self._paused = False
        self._complete = False  # the whole response has arrived
        self._delimited = False  # the body has a length or chunks, not "until the close"
        self._keep_alive = False  # the peer lets this connection carry another request
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._in_flight = False

    # -- asyncio protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not an asyncio.Transport subclass under every event loop (uvloop's is not)
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if not self._in_flight or self._complete:
            self._fail(httpx.RemoteProtocolError("the peer sent data no request asked for"))
            return
        try:
            self._parser.feed_data(receive_buffer()[:nbytes])
        except httptools.HttpParserError as exc:
            if self._error is None:
                self._error = httpx.RemoteProtocolError(f"malformed HTTP response: {exc}")
        if self._error is not None:
            self._fail(self._error)
            return
        held = self._queued + self.decoder.buffered
        if held > FREE_BUFFER_BYTES or self._held:
            self._account(held)
            if self._error is not None:
                return
        if self._queued > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._notify:  # not for a read that only completed part of an event
            self._notify = False
            self._wake()
        elif self._waiter is not None:
            # bytes that complete nothing (a comment kept alive, a long event) still count
            # as the upstream being there: the read timeout is for silence
            self._deadline.at = self._loop.time() + self._read_timeout

    def eof_received(self) -> bool:
        if self._in_flight and not self._complete:
            if self._headers_done and not self._delimited:
                self._end_of_message()  # a body delimited by the connection's close
            else:
                self._error = httpx.RemoteProtocolError(
                    "the peer closed the connection before the response was complete"
                )
        self.closed = True
        self._wake()
        return False  # close our side too: HTTP/1.1 has no use for a half-open socket

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self._in_flight and not self._complete:
            self._error = httpx.ReadError(str(exc) if exc else "connection lost")
        self.closed = True
        self._wake()

    def _account(self, held: int) -> None:
        """Count what this stream holds over its free allowance against the shared budget,
        and end it if it grew the total past the budget."""
        charged = max(0, held - FREE_BUFFER_BYTES)
        client = self._client
        grew = charged > self._held
        client.buffered += charged - self._held
        self._held = charged
        if grew and client.buffered > client.max_buffered_bytes:
            # let go of it now, not when the handler has unwound: the streams that grow
            # meanwhile must not be ended for bytes on their way out
            client.buffered -= charged
            self._held = 0
            self._fail(
                BufferBudgetExceededError(
                    f"upstream events held by all streams passed {client.max_buffered_bytes} bytes"
                )
            )

    # -- llhttp callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:
            return  # informational (103 Early Hints): the response proper follows
        self._headers_done = True
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._delimited = True
        self._streaming = self.status == 200
        self._notify = True

    def on_body(self, body: bytes) -> None:
        if not self._streaming:
            if len(self._body) < _MAX_BODY_BYTES:
                self._body += body
                self._notify = True
            return
        try:
            events = self.decoder.feed(body)
        except SSEProtocolError as exc:
            self._error = exc
            return
        if events:
            self._events.extend(events)
            self._queued += sum(map(len, events))
            self._notify = True

    def on_message_complete(self) -> None:
        if self.status < 200:
            self.headers = []
            return
        # asked now: once this callback returns, llhttp resets for the next message
        self._keep_alive = self._parser.should_keep_alive()
        self._end_of_message()

    def _end_of_message(self) -> None:
        self._complete = True
        self._notify = True
        if self._streaming:
            try:
                self._events.extend(self.decoder.finish())
            except SSEProtocolError as exc:
                self._error = exc

    # -- used by the client and the response -------------------------------------------------

    @property
    def reusable(self) -> bool:
        return not self.closed and self._complete and self._error is None and self._keep_alive

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._begin_response()
        self._in_flight = True
        self._watchdog.watch(self._deadline)
        self.transport.write(request)

    async def wait_for_headers(self) -> None:
        while not self._headers_done:
            await self._wait()

    async def receive_events(self) -> list[bytes]:
        while not self._events:
            if self._complete or self._error is not None or self.closed:
                if self._error is not None:
                    raise self._error
                if not self._complete:
                    raise httpx.ReadError("connection lost")
                return []
            await self._wait()
        events = self._events
        self._events = []
        self._queued = 0
        if self._held:
            self._account(self.decoder.buffered)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return events

    async def read_body(self, limit: int) -> bytes:
        limit = min(limit, _MAX_BODY_BYTES)
        while not self._complete and self._error is None and not self.closed:
            if len(self._body) >= limit:
                break
            await self._wait()
        return bytes(self._body[:limit])

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise httpx.ReadError("connection lost")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        self._deadline.at = self._loop.time() + self._read_timeout
        try:
            await waiter
        finally:
            self._waiter = None
            self._deadline.at = NOT_ARMED
        if self._error is not None:
            raise self._error

    def _timed_out(self) -> None:
        if self._error is None:
            self._error = httpx.ReadTimeout(f"no data for {self._read_timeout:g} s")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.abort()
        self._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def finish(self) -> bool:
        """The request is over: True if the connection can take another one."""
        self._in_flight = False
        self._watchdog.forget(self._deadline)
        if self._held:  # what it held is let go with the response
            self._client.buffered -= self._held
            self._held = 0
        if self.reusable:
            self._waiter = None
            return True
        self.abort()
        return False


class SSEClient:
    """Keep-alive connections to the upstream origins, at most `max_connections` open; a
    request waits at most `timeout.pool` for one (`httpx.PoolTimeout`)."""

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
        max_event_bytes: int | None = None,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_SECONDS,
    ) -> None:
        self.connect_timeout = timeout.connect
        # httpx's None (no read timeout) arms no deadline: now + inf never passes
        self.read_timeout = timeout.read if timeout.read is not None else math.inf
        self.pool_timeout = timeout.pool
        self.max_event_bytes = max_event_bytes or DEFAULT_MAX_EVENT_BYTES
        # every stream's upstream event bytes over FREE_BUFFER_BYTES, together
        self.max_buffered_bytes = max_buffered_bytes
        self.buffered = 0
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # read timeouts are coarse (a quarter second late at most) and cheap per read
        self.watchdog = Watchdog(resolution=min(0.25, self.read_timeout / 4))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def open_connections(self) -> int:
        """Connections open now, in use or idle."""
        return self._open

    @contextlib.asynccontextmanager
    async def stream(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[SSEResponse]:
        """POST `body` to `url` and yield the response once its headers are in. Leaving the
        block ends the request: a connection whose response was read to its end goes back to
        the pool, any other is closed at once (never awaited, so a cancelled caller cannot
        leave it half closed)."""
        origin, request = _request(url, body, headers)
        connection = await self._acquire(origin)
        try:
            connection.send(request)
            await connection.wait_for_headers()
            yield SSEResponse(connection)
        finally:
            self._release(connection)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().abort()
                self._open -= 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the client was closed"))

    # -- the pool ------------------------------------------------------------------------------

    async def _acquire(self, origin: _Origin) -> _Connection:
        if self._closed:
            raise httpx.ConnectError("the client was closed")
        loop = self.loop
        deadline = None if self.pool_timeout is None else loop.time() + self.pool_timeout
        while True:
            idle = self._idle.get(origin)
            now = loop.time()
            while idle:
                connection = idle.pop()  # the most recently used: the warmest
                if not connection.closed and now - connection.idle_since < self._keepalive_expiry:
                    return connection
                self._discard(connection)
            if self._open < self._max_connections or self._close_oldest_idle():
                self._open += 1
                try:
                    return await self._connect(origin)
                except BaseException:
                    self._open -= 1
                    self._wake_waiter()
                    raise
            await self._wait_for_room(deadline)

    async def _wait_for_room(self, deadline: float | None) -> None:
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            timeout = None if deadline is None else max(0.0, deadline - self.loop.time())
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"all {self._max_connections} upstream connections stayed busy"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self, connection: _Connection) -> None:
        if connection.finish() and not self._closed:
            connection.idle_since = self.loop.time()
            idle = self._idle.setdefault(connection.origin, deque())
            idle.append(connection)
            # expired connections sink to the bottom of the stack: close them as they are seen
            while idle and self.loop.time() - idle[0].idle_since >= self._keepalive_expiry:
                self._discard(idle.popleft())
        else:
            self._open -= 1
        self._wake_waiter()

    def _discard(self, connection: _Connection) -> None:
        connection.abort()
        self._open -= 1

    def _close_oldest_idle(self) -> bool:
        """Make room at the cap by closing an idle connection (to another origin: this
        origin's idle ones were taken first)."""
        for idle in self._idle.values():
            if idle:
                self._discard(idle.popleft())
                return True
        return False

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: _Origin) -> _Connection:
        connection = _Connection(self, origin)
        context = None
        if origin.tls:
            context = self._ssl or ssl.create_default_context()
        # asyncio sets TCP_NODELAY itself. Happy eyeballs (RFC 8305): a host with a dead IPv6
        # route must not spend the whole connect timeout on its first address.
        connecting = self.loop.create_connection(
            lambda: connection,
            origin.host,
            origin.port,
            ssl=context,
            server_hostname=origin.host if context else None,
            happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
        )
        try:
            await asyncio.wait_for(connecting, self.connect_timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection within {self.connect_timeout} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return connection


def _request(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[_Origin, bytes]:
    """Where to connect and the request's bytes."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise httpx.UnsupportedProtocol(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    default_port = port == (443 if tls else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host_header}",
        f"Content-Length: {len(body)}",
    ]
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0"):
            raise httpx.LocalProtocolError(f"header {name!r} has a line break in it")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return _Origin(host, port, tls), head + body
