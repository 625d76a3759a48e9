"""Raw loopback sockets in the states the port-reservation tests need."""

from __future__ import annotations

import socket
import time

from harness.processes import TIME_WAIT, port_sockets


def bound_socket(port: int, *, reuse_address: bool, reuse_port: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def leave_time_wait(*, reuse_port: bool) -> int:
    """A port whose server closed an accepted connection first: it lingers in TIME_WAIT."""
    listener = bound_socket(0, reuse_address=True, reuse_port=reuse_port)
    port = int(listener.getsockname()[1])
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()
    client.recv(1)  # the server's FIN
    client.close()
    listener.close()
    deadline = time.monotonic() + 5
    while not port_sockets(port, TIME_WAIT) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert port_sockets(port, TIME_WAIT), "no TIME_WAIT to test against"
    return port
