"""The HTTP listener (`HEALTHAGENT_HTTP_LISTEN`, `serve --http`): ASGI on uvicorn, in the
service's own process and event loop.

It serves gRPC-Web at the root path (grpc-dart drops any path prefix), the seeds' contract at
`/functions/v1/health-agent`, and, when `HEALTHAGENT_HTTP_DEMO` is on, the demo page at `/`;
CORS for the configured origins wraps them all. Every call is forwarded to this process's gRPC
server over a private socket of its own (plain, whatever TLS the public port has), so nothing
about a call is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, Generator
from importlib import resources
from typing import Any

import structlog
import uvicorn
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from healthagent_service.listen import is_loopback
from healthagent_service.web.forwarding import ForwardingChannel
from healthagent_service.web.grpc_web import GrpcWebBridge, Receive, Scope, Send
from healthagent_service.web.seed_contract import (
    HEARTBEAT,
    SSE_HEADERS,
    ContractError,
    SeedContract,
    parse_body,
)

log = structlog.get_logger(__name__)

SEED_PATH = "/functions/v1/health-agent"
MAX_SEED_BODY_BYTES = 1024 * 1024
RESPONSE_MESSAGE_LIMIT = 8 * 1024 * 1024  # the largest response message taken from the server
ALLOWED_HEADERS = [
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "x-request-id",
]
EXPOSED_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id"]
_DEMO_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_DEMO_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript"),
}


class WebApp:
    """Routes one HTTP request to the gRPC-Web bridge, the seeds' contract or the demo page."""

    def __init__(
        self,
        channel: ForwardingChannel,
        *,
        max_message_bytes: int,
        demo: bool,
        heartbeat_seconds: float,
        loopback_hosts_only: bool,
    ) -> None:
        self._loopback_hosts_only = loopback_hosts_only
        self.bridge = GrpcWebBridge(channel, max_message_bytes)
        self.contract = SeedContract(channel)
        self._heartbeat_seconds = heartbeat_seconds
        self._demo = demo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self._loopback_hosts_only and not _names_loopback(scope):
            # no authentication: only this machine may call, and a page on another site that
            # rebinds its name to 127.0.0.1 still sends its own Host
            await JSONResponse({"error": "unknown host"}, status_code=421)(scope, receive, send)
            return
        path = scope["path"]
        if self.bridge.serves(path):
            await self.bridge(scope, receive, send)
            return
        if path == SEED_PATH:
            answer = await self._seed(Request(scope, receive))
            if not isinstance(answer, Response):
                await write_event_stream(answer, receive, send, self._heartbeat_seconds)
                return
            response = answer
        elif self._demo and path in _DEMO_FILES and scope["method"] == "GET":
            name, media_type = _DEMO_FILES[path]
            page = resources.files("healthagent_service.web").joinpath("demo", name).read_bytes()
            response = Response(page, media_type=media_type, headers=_DEMO_HEADERS)
        else:
            response = JSONResponse({"error": f"no such path: {path}"}, status_code=404)
        await response(scope, receive, send)

    async def _seed(self, request: Request) -> Response | AsyncGenerator[bytes, None]:
        if request.method != "POST":
            return JSONResponse({"success": False, "error": "use POST"}, status_code=405)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # a JSON body, declared: a page on another site cannot send one without a CORS
            # preflight, which only the configured origins pass
            return JSONResponse(
                {"success": False, "error": "Content-Type must be application/json"},
                status_code=415,
            )
        try:
            raw = bytearray()
            async for piece in request.stream():
                raw += piece
                if len(raw) > MAX_SEED_BODY_BYTES:
                    return JSONResponse(
                        {"success": False, "error": "request body too large"}, status_code=413
                    )
            answer = await self.contract.answer(parse_body(bytes(raw)), request.headers)
        except ContractError as refused:
            return JSONResponse(refused.body, status_code=refused.status)
        if isinstance(answer, dict):
            return JSONResponse(answer)
        return answer


async def write_event_stream(
    body: AsyncGenerator[bytes, None], receive: Receive, send: Send, heartbeat_seconds: float
) -> None:
    """The SSE `body` written straight to ASGI `send`, a heartbeat comment in every silence of
    `heartbeat_seconds`, until the body ends or the client leaves (a disconnect on `receive`),
    which closes the body and with it the call.

    Three plain tasks a response, each woken only for its own reason: the writer by the call's
    events, the heartbeat by its timer, the watcher by the client. Starlette's
    `StreamingResponse` ran the body in an anyio task group (3.5% of `serve`'s samples under
    SSE load), and a reader task handing events to the writer cost a task switch a chunk
    (docs/decisions/0008-http-listener-loopback-hop.md). uvicorn writes each `send` whole, so a
    heartbeat never lands inside an event."""
    loop = asyncio.get_running_loop()
    sent_at = loop.time()

    async def beat() -> None:
        nonlocal sent_at
        while True:
            silence = loop.time() - sent_at
            if silence < heartbeat_seconds:
                await asyncio.sleep(heartbeat_seconds - silence)
                continue
            sent_at = loop.time()
            await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})

    async def write() -> None:
        nonlocal sent_at
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        heartbeat = asyncio.create_task(beat())
        try:
            async for piece in body:
                sent_at = loop.time()
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def client_left() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    writer = asyncio.create_task(write())
    watcher = asyncio.create_task(client_left())
    try:
        await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (writer, watcher):
            task.cancel()
        await asyncio.gather(writer, watcher, return_exceptions=True)
        await body.aclose()
    if writer.done() and not writer.cancelled():
        writer.result()  # a failure of the writer's own is the server's error, as before


def _names_loopback(scope: Scope) -> bool:
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name.strip("[]"))


class _EmbeddedServer(uvicorn.Server):
    """uvicorn in `serve`'s loop: `serve` owns the signals and the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpListener:
    """The listener's socket, uvicorn server and private channel to the gRPC server."""

    def __init__(
        self,
        server: uvicorn.Server,
        task: asyncio.Task[None],
        channel: ForwardingChannel,
        port: int,
    ) -> None:
        self._server = server
        self._task = task
        self._channel = channel
        self.port = port

    async def stop(self, grace: float) -> None:
        """Stop taking connections; give open ones `grace` seconds (they are gRPC calls, which
        the gRPC server's own shutdown ends), then close."""
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), grace + 1.0)
        if not self._task.done():
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await self._task
        await self._channel.close()


def _listening_socket(host: str, port: int, *, share: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets whose
    # protocol says TCP; with Nagle on, a chunk written while the last one is unacknowledged
    # waits for the client's delayed ACK, up to 40 ms
    # (docs/decisions/0008-http-listener-loopback-hop.md)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share:  # `serve --workers`: the workers share the port, as they share the gRPC one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def start_http_listener(
    host: str,
    port: int,
    *,
    grpc_target: str,
    cors_origins: list[str],
    max_message_bytes: int,
    demo: bool,
    open_access: bool,
    share_port: bool,
    grace_seconds: float,
    heartbeat_seconds: float,
) -> HttpListener:
    """Listen on host:port (0 picks one: see `HttpListener.port`), forwarding to the gRPC
    server's private port at `grpc_target` (a channel target)."""
    channel = ForwardingChannel(grpc_target, max_message_bytes=RESPONSE_MESSAGE_LIMIT)
    app: Any = WebApp(
        channel,
        max_message_bytes=max_message_bytes,
        demo=demo,
        heartbeat_seconds=heartbeat_seconds,
        loopback_hosts_only=open_access,
    )
    if cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    sock = _listening_socket(host, port, share=share_port)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        log_config=None,  # uvicorn's records go through the service's logging (JSON, redacted)
        # streams are long: no compression (none is configured), and no keep-alive cut-off
        timeout_graceful_shutdown=max(1, int(grace_seconds)),
        server_header=False,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await channel.close()
            task.result()
            raise OSError(f"the HTTP listener could not start on {host}:{port}")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    log.info("HTTP listener", listen=f"{host}:{bound}", cors_origins=cors_origins, demo=demo)
    return HttpListener(server, task, channel, bound)
