"""The emulator's HTTP server under a burst of new connections while its event loop is busy
(as when it paces thousands of streams): the kernel queues them all for it, drops none."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from healthagent_service.emulator.http_server import HttpRequest, HttpResponse, HttpServer

BURST = 300  # three times asyncio's default listen backlog


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    raise AssertionError("no TcpExt counters in /proc/net/netstat")


async def test_a_burst_of_connections_to_a_busy_loop_is_not_dropped() -> None:
    async def answer(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, body=b"ok")

    server = HttpServer(answer)
    port = await server.start("127.0.0.1", 0)
    connections: list[socket.socket] = []

    def connect() -> None:
        for _ in range(BURST):
            try:  # a dropped handshake is retried by the kernel only after a second
                connections.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except TimeoutError:
                return

    before = listen_overflows()
    try:
        burst = threading.Thread(target=connect)
        burst.start()
        burst.join(30)  # blocks the event loop on purpose: nothing is accepted meanwhile
        overflows = listen_overflows() - before
    finally:
        for connection in connections:
            connection.close()
        await server.close()
    assert len(connections) == BURST and overflows == 0, (len(connections), overflows)
