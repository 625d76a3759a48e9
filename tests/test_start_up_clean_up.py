"""A start-up step that fails releases what the steps before it took: the emulator's and the
HTTP listener's ports, the PostgreSQL and Redis connections, the agent child process."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from healthagent_service.server import create_server
from tests.support.service import make_settings
from tests.support.stores import POSTGRES_DSN, postgres_schema, require_postgres

REDIS_URL = os.environ.get("HEALTHAGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _open_sockets() -> set[str]:
    """This process's open sockets (`socket:[inode]`)."""
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the directory's own descriptor, closed meanwhile
            continue
        if target.startswith("socket:"):
            sockets.add(target)
    return sockets


def _children() -> set[int]:
    """This process's child processes."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as children:
            pids.update(int(pid) for pid in children.read().split())
    return pids


@contextmanager
def _taken_port() -> Iterator[int]:
    """A loopback port that something else listens on meanwhile."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _settled(expected: set[str]) -> set[str]:
    """The open sockets once closes the event loop has scheduled have run (up to 5 s)."""
    for _ in range(50):
        now = _open_sockets()
        if now == expected:
            break
        await asyncio.sleep(0.1)
    return now


async def _fails_and_releases(
    env: dict[str, Any], *, failing: dict[str, Any], listen: str = "127.0.0.1:0", message: str
) -> None:
    """Start and stop a server with `env` once (what a first start sets up for the whole
    process stays), then check that a start with `failing` on top, which fails with `message`,
    leaves as many open sockets and child processes as there were before it."""
    running = await create_server(make_settings(**env), "127.0.0.1:0")
    await running.stop(0)
    sockets, children = await _settled(_open_sockets()), _children()
    with pytest.raises(Exception, match=message):
        await create_server(make_settings(**{**env, **failing}), listen)
    assert await _settled(sockets) == sockets
    assert _children() <= children


@pytest.fixture
async def env(tmp_path: Path) -> Any:
    """Every kind of resource start-up takes: the embedded emulator, PostgreSQL (its own
    schema), Redis, the HTTP listener and metrics."""
    await require_postgres()
    async with postgres_schema() as schema:
        yield {
            "HEALTHAGENT_UPSTREAM": "emulator",
            "HEALTHAGENT_DATABASE_URL": POSTGRES_DSN,
            "HEALTHAGENT_DATABASE_SCHEMA": schema,
            "HEALTHAGENT_REDIS_URL": REDIS_URL,
            "HEALTHAGENT_REDIS_PREFIX": f"test-{secrets.token_hex(4)}",
            "HEALTHAGENT_HTTP_LISTEN": "127.0.0.1:0",
            "HEALTHAGENT_METRICS_LISTEN": "127.0.0.1:0",
            "HEALTHAGENT_DATA_DIR": str(tmp_path),
        }


async def test_a_stopped_server_releases_everything_it_took(env: dict[str, Any]) -> None:
    """What a start takes, a stop gives back, the metrics endpoint included (it stayed open
    until the process ended: a server restarted in process could not bind its port again)."""
    running = await create_server(make_settings(**env), "127.0.0.1:0")
    await running.stop(0)
    sockets, children = await _settled(_open_sockets()), _children()
    port = _unused_port()
    running = await create_server(
        make_settings(**{**env, "HEALTHAGENT_METRICS_LISTEN": f"127.0.0.1:{port}"}), "127.0.0.1:0"
    )
    await running.stop(0)
    assert await _settled(sockets) == sockets
    assert _children() <= children
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def _unreachable_redis() -> dict[str, Any]:
    return {"HEALTHAGENT_REDIS_URL": f"redis://127.0.0.1:{_unused_port()}/0"}


async def test_unreachable_redis_releases_the_emulator_database_and_ports(
    env: dict[str, Any],
) -> None:
    await _fails_and_releases(env, failing=_unreachable_redis(), message="cannot reach Redis")


async def test_a_taken_grpc_port_releases_everything_taken_before(env: dict[str, Any]) -> None:
    with _taken_port() as port:
        await _fails_and_releases(env, failing={}, listen=f"127.0.0.1:{port}", message="in use")


async def test_a_taken_metrics_port_stops_the_started_servers_and_listener(
    env: dict[str, Any],
) -> None:
    """The last step: the gRPC servers and the HTTP listener were serving already."""
    with _taken_port() as port:
        failing = {"HEALTHAGENT_METRICS_LISTEN": f"127.0.0.1:{port}"}
        await _fails_and_releases(env, failing=failing, message="Address already in use")


@pytest.mark.slow
async def test_unreachable_redis_stops_the_agent_child_process(env: dict[str, Any]) -> None:
    env["HEALTHAGENT_UPSTREAM"] = "agent"
    await _fails_and_releases(env, failing=_unreachable_redis(), message="cannot reach Redis")
