"""Listen addresses ('HOST:PORT' or '[V6]:PORT') and holding a port that several sockets share."""

from __future__ import annotations

import errno
import ipaddress
import socket
from types import TracebackType

# An address the host resolves to but this machine cannot bind (::1 with IPv6 off): gRPC skips
# such an address when it has others, and so does the reservation.
_UNAVAILABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
_PORT_ZERO_ATTEMPTS = 5  # port 0 on several addresses: the port chosen on the first may be
# taken on another


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def join_listen(host: str, port: int) -> str:
    """(host, port) -> 'HOST:PORT', with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PortReservation:
    """Sockets holding one port on every address of a host, bound with SO_REUSEPORT and never
    listened on: the listeners that share the port on purpose can come and go (workers
    restarting) while nothing else takes it."""

    def __init__(self, holders: list[socket.socket]) -> None:
        self._holders = holders
        self.port = int(holders[0].getsockname()[1])

    def close(self) -> None:
        for holder in self._holders:
            holder.close()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def reserve_port(host: str, port: int) -> PortReservation:
    """Hold `host:port` (port 0 picks one) on each address `host` resolves to, as gRPC binds
    each. Raises OSError (address in use) if anything holds the port already, even with
    SO_REUSEPORT: a second group on the same port must fail, not share it."""
    addresses = list(
        dict.fromkeys(
            (family, kind, proto, address)
            for family, kind, proto, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )
    )
    for attempt in range(1, _PORT_ZERO_ATTEMPTS + 1):
        holders: list[socket.socket] = []
        try:
            for family, kind, proto, resolved in addresses:
                address = resolved
                if holders:  # port 0: the port the first address got
                    address = (resolved[0], holders[0].getsockname()[1], *resolved[2:])
                try:
                    holders.append(_hold(family, kind, proto, address))
                except OSError as error:
                    if error.errno not in _UNAVAILABLE:
                        raise
            if not holders:
                raise OSError(errno.EADDRNOTAVAIL, f"cannot bind any address of {host}")
            return PortReservation(holders)
        except OSError as error:
            for holder in holders:
                holder.close()
            # port 0: another process took the chosen port in the meantime; choose again
            if port != 0 or error.errno != errno.EADDRINUSE or attempt == _PORT_ZERO_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _hold(family: int, kind: int, proto: int, address: tuple[object, ...]) -> socket.socket:
    # SO_REUSEADDR: connections closed by a previous server linger on the port in TIME_WAIT,
    # and without it the probe would refuse a restart for a minute; it still fails on a
    # listening socket and on another holder.
    with socket.socket(family, kind, proto) as probe:  # no SO_REUSEPORT: fails if taken
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = (address[0], probe.getsockname()[1], *address[2:])
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind(address)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            # TIME_WAIT left by a server that did not share its port (SO_REUSEPORT off) blocks
            # a SO_REUSEPORT-only bind; with SO_REUSEADDR too, a probe could join this holder
            # while no listener is up, so that is the fallback, not the rule
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(address)
    except BaseException:
        holder.close()
        raise
    return holder


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
