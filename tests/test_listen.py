"""`listen.reserve_port` on real sockets: the port stays held against everything but the
listeners that share it on purpose, and a restart is not refused by connections in TIME_WAIT."""

from __future__ import annotations

import errno
import socket

import pytest

from healthagent_service.listen import reserve_port
from tests.support.sockets import bound_socket, leave_time_wait


def test_a_reserved_port_refuses_every_bind_but_a_sharing_listener() -> None:
    with reserve_port("127.0.0.1", 0) as reservation:
        port = reservation.port
        for reuse_address, reuse_port in ((False, False), (True, False)):
            with pytest.raises(OSError) as refused:
                bound_socket(port, reuse_address=reuse_address, reuse_port=reuse_port)
            assert refused.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError) as refused:
            reserve_port("127.0.0.1", port)  # another group
        assert refused.value.errno == errno.EADDRINUSE
        # what gRPC's servers do with SO_REUSEPORT on: they join, and then a second group
        # is refused by their listening sockets too
        with bound_socket(port, reuse_address=True, reuse_port=True) as listener:
            listener.listen()
            with pytest.raises(OSError):
                reserve_port("127.0.0.1", port)
    with bound_socket(port, reuse_address=False, reuse_port=False):
        pass  # released


@pytest.mark.parametrize("reuse_port", [False, True], ids=["after-one-server", "after-shared"])
def test_a_restart_is_not_refused_by_time_wait(reuse_port: bool) -> None:
    port = leave_time_wait(reuse_port=reuse_port)
    with reserve_port("127.0.0.1", port) as reservation:
        assert reservation.port == port
        if reuse_port:  # the holder is strict: a second group is refused at once
            with pytest.raises(OSError):
                reserve_port("127.0.0.1", port)
        # After a server that did not share its port, the holder needed SO_REUSEADDR as well
        # (listen.py): until the TIME_WAIT is gone it is the listeners that refuse others.
        with bound_socket(port, reuse_address=True, reuse_port=True) as listener:
            listener.listen()
            with pytest.raises(OSError):
                reserve_port("127.0.0.1", port)


def test_every_address_of_a_name_is_held() -> None:
    resolved = {
        (int(family), str(address[0]))
        for family, _, _, _, address in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
    }
    with reserve_port("localhost", 0) as reservation:
        held = 0
        for family, host in resolved:
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, reservation.port))
                except OSError as error:
                    held += error.errno == errno.EADDRINUSE
        assert held >= 1 and held == len(resolved) - unbindable(resolved)


def unbindable(resolved: set[tuple[int, str]]) -> int:
    """Addresses this machine has no interface for (::1 with IPv6 off)."""
    count = 0
    for family, host in resolved:
        with socket.socket(family) as probe:
            try:
                probe.bind((host, 0))
            except OSError:
                count += 1
    return count
