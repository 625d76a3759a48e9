"""Listen addresses ('HOST:PORT' or '[V6]:PORT') and holding a port that several sockets share."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def join_listen(host: str, port: int) -> str:
    """(host, port) -> 'HOST:PORT', with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket holding `host:port` (port 0 picks one) with SO_REUSEPORT, bound and never
    listened on, so that the listeners sharing the port on purpose can come and go while
    nothing else takes it. Raises OSError (address in use) if anything holds the port already,
    even with SO_REUSEPORT: a second group on the same port must fail, not share it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:  # no SO_REUSEPORT: fails if taken
        probe.bind(address)
        address = (address[0], probe.getsockname()[1], *address[2:])
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except BaseException:
        holder.close()
        raise
    return holder


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """`reserve_port` for the length of a block; yields the port."""
    with reserve_port(host, port) as holder:
        yield int(holder.getsockname()[1])
