"""A small asyncio HTTP/1.1 server on h11 (already a dependency of httpx), for the emulator.

It supports what the emulator needs and no more: one request at a time per connection,
keep-alive, fixed or streamed (chunked) bodies, and noticing at once when a client goes away
in the middle of a streamed body, so the emulator can observe cancellations.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11
import structlog

log = structlog.get_logger(__name__)

MAX_REQUEST_BODY_BYTES = 1024 * 1024
_READ_SIZE = 65536
# asyncio's default of 100 overflows when a busy loop takes up a ramp of new connections late:
# the kernel drops the handshakes and clients retry after 1, 3, 7, 15 s (seen at 10,000 open
# streams, docs/emulator.md#listen-backlog). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = socket.SOMAXCONN


@dataclass(slots=True)
class HttpRequest:
    """A complete request. Header names are lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class HttpResponse:
    """A response with either a fixed `body` or a `stream` of body pieces.

    `on_client_left` is called, after the stream's clean-up, with the `time.monotonic()` at
    which the server noticed that the client had gone before the streamed body ended.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    on_client_left: Callable[[float], None] | None = None


class DropConnection(Exception):  # noqa: N818 - it is an instruction, not an error
    """Raised by a body stream to cut the connection without finishing the response, or by a
    handler to cut it without any response."""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class HttpServer:
    """Serves `handler` on a TCP port."""

    def __init__(
        self, handler: Handler, *, on_disconnect: Callable[[], None] | None = None
    ) -> None:
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=_READ_SIZE, backlog=LISTEN_BACKLOG
        )
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError, DropConnection):
            pass
        except asyncio.CancelledError:
            pass  # close() ends connections this way; the task simply ends
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_READ_SIZE)
        while True:
            request = await _read_request(conn, reader)
            if request is None:
                return
            if isinstance(request, HttpResponse):  # the request itself was unacceptable
                response = request
            else:
                try:
                    response = await self._handler(request)
                except DropConnection:
                    raise
                except Exception:
                    log.exception("emulator handler failed")
                    response = HttpResponse(500, body=b'{"error":{"message":"emulator failure"}}')
            if response.stream is None:
                headers = [*response.headers, ("content-length", str(len(response.body)))]
                writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
                writer.write(conn.send(h11.Data(data=response.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
            elif not await self._stream(conn, reader, writer, response):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _stream(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: HttpResponse,
    ) -> bool:
        """Send a streamed body; False if the client went away (or the stream dropped it)."""
        assert response.stream is not None
        stream = response.stream
        writer.write(conn.send(h11.Response(status_code=response.status, headers=response.headers)))
        pump = asyncio.create_task(_pump(conn, writer, stream))
        watcher = asyncio.create_task(reader.read(_READ_SIZE))
        client_left = False
        left_at = 0.0
        try:
            done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                data = b"" if watcher.exception() is not None else watcher.result()
                if not data:  # EOF or reset while streaming: the client left
                    client_left = True
                    left_at = time.monotonic()
                    return False
                conn.receive_data(data)  # an early next request; keep it for later
                await asyncio.wait({pump})
            error = pump.exception()
            if error is None:
                return True
            if isinstance(error, ConnectionError):  # the client left while we were writing
                client_left = True
                left_at = time.monotonic()
                return False
            raise error
        finally:
            for task in (pump, watcher):
                task.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            await stream.aclose()  # runs the body's own clean-up now, not at GC time
            # reported only after the body's clean-up, so observers never see a
            # disconnect counted while its stream still looks open
            if client_left and response.on_client_left is not None:
                response.on_client_left(left_at)
            if client_left and self._on_disconnect is not None:
                self._on_disconnect()


async def _pump(
    conn: h11.Connection, writer: asyncio.StreamWriter, stream: AsyncIterator[bytes]
) -> None:
    # A streamed body to an HTTP/1.1 client is chunked (it has no length). The chunks are
    # framed here rather than through h11, which costs several times as much per event (the
    # emulator shares the benchmark machine with the service); h11 still ends the message.
    chunked = conn.their_http_version == b"1.1"
    async for piece in stream:
        if not piece:
            continue  # an empty chunk would end the body
        writer.write(
            b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else conn.send(h11.Data(data=piece))
        )
        await writer.drain()
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> HttpRequest | HttpResponse | None:
    """The next request, an error response for an unacceptable one, or None at EOF."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_SIZE)
            conn.receive_data(data)
            if not data and request is None:
                return None
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY_BYTES:
                return HttpResponse(
                    413,
                    [("connection", "close")],
                    b'{"error":{"message":"request body too large"}}',
                )
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return HttpRequest(
                method=request.method.decode(),
                path=request.target.decode(),
                headers={k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None
