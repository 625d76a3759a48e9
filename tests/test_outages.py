"""PostgreSQL failing under the service, for real: its connections terminated mid-call with
`pg_terminate_backend` (only this test's, by application name), and the database made
unreachable by stopping a loopback forwarder that stands between them. Calls that need it end
UNAVAILABLE (`HISTORY_UNAVAILABLE`, with `RetryInfo`), never INTERNAL; an answer that was
complete still ends OK; health says NOT_SERVING while it is gone (issue 23, item 2). Redis
outages are in test_limits.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect, status_details
from tests.support.service import ServiceFactory, emulator_env
from tests.support.stores import POSTGRES_DSN, postgres_schema


def assert_history_unavailable(error: grpc.aio.AioRpcError) -> None:
    details = status_details(error)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "HISTORY_UNAVAILABLE")
    assert details.retry_delay_seconds


@contextlib.asynccontextmanager
async def table_locked(schema: str, table: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold an exclusive lock on one of the schema's tables: the service's statements on it
    wait. Yields the connection holding it."""
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        async with admin.transaction():
            await admin.execute(f"LOCK TABLE {schema}.{table} IN ACCESS EXCLUSIVE MODE")
            yield admin
    finally:
        await admin.close()


async def terminate_waiting(schema: str, count: int) -> None:
    """Wait (bounded) until `count` of the service's connections wait for a lock, then
    terminate them: the connection is lost in the middle of their statements. (From a
    connection of its own: inside the lock holder's transaction, pg_stat_activity would be
    the snapshot its first read took.)"""
    name = f"healthagent/{schema}"
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        " AND wait_event_type = 'Lock'"
    )
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        for _ in range(400):  # 8 s, within the service's 10 s statement timeout
            if await admin.fetchval(query, name) >= count:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the service's statements never waited for the lock")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1"
            " AND wait_event_type = 'Lock'",
            name,
        )
    finally:
        await admin.close()


async def test_a_connection_lost_mid_call_is_unavailable(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    async with postgres_schema() as schema:
        service = await start_service(
            **emulator_env(
                emulator, HEALTHAGENT_DATABASE_URL=POSTGRES_DSN, HEALTHAGENT_DATABASE_SCHEMA=schema
            )
        )
        stub = service.stub
        await collect(stub.Chat(pb.ChatRequest(message="hi", user="pg")))
        async with table_locked(schema, "conversations"):
            listing = asyncio.ensure_future(
                stub.ListConversations(pb.ListConversationsRequest(user="pg"))
            )
            chat = asyncio.ensure_future(
                collect(stub.Chat(pb.ChatRequest(message="again", user="pg")))
            )
            await terminate_waiting(schema, 2)
        for call in (listing, chat):
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await call
            assert_history_unavailable(lost.value)
        # A turn whose end cannot be written: the caller had the whole answer, so it ends OK.
        stream = stub.Chat(pb.ChatRequest(message="[chunks=40] [pace=20]", user="pg"))
        events = stream.__aiter__()
        received = [await events.__anext__()]  # the session event: the turn's start is written
        async with table_locked(schema, "messages"):
            finishing = asyncio.ensure_future(collect_rest(events, received))
            await terminate_waiting(schema, 1)
        received = await finishing
        assert received[-1].WhichOneof("event") == "response_done"
        # and the service carries on with fresh connections
        listed = await stub.ListConversations(pb.ListConversationsRequest(user="pg"))
        assert len(listed.conversations) == 2


async def collect_rest(events: Any, received: list[pb.ChatResponse]) -> list[pb.ChatResponse]:
    return received + [event async for event in events]


class Forwarder:
    """A loopback TCP forwarder to PostgreSQL on a port of its own: stopping it is an outage
    of the database as the service sees it (refused connections, existing ones cut)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


async def test_health_follows_postgres_and_calls_are_unavailable_meanwhile(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    parts = urlsplit(POSTGRES_DSN)
    forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    await forwarder.start()
    netloc = f"{parts.username}@127.0.0.1:{forwarder.port}" if parts.username else None
    dsn = urlunsplit(parts._replace(netloc=netloc or f"127.0.0.1:{forwarder.port}"))
    async with postgres_schema() as schema:
        service = await start_service(
            **emulator_env(
                emulator, HEALTHAGENT_DATABASE_URL=dsn, HEALTHAGENT_DATABASE_SCHEMA=schema
            )
        )
        health: Any = health_pb2_grpc.HealthStub(service.channel)
        stub = service.stub
        await collect(stub.Chat(pb.ChatRequest(message="hi", user="fw")))
        await forwarder.stop()
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.ListConversations(pb.ListConversationsRequest(user="fw"))
        assert_history_unavailable(down.value)
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await collect(stub.Chat(pb.ChatRequest(message="hi", user="fw")))
        assert_history_unavailable(down.value)
        await wait_for_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await forwarder.start()
        await wait_for_health(health, health_pb2.HealthCheckResponse.SERVING)
        listed = await stub.ListConversations(pb.ListConversationsRequest(user="fw"))
        assert len(listed.conversations) == 1
        await forwarder.stop()


async def wait_for_health(health: Any, expected: Any, timeout: float = 10.0) -> None:
    """Wait until the service's readiness (`healthagent.v1.HealthAgent`) says `expected`; the
    overall status ("", what liveness probes ask) stays SERVING through an outage, or every
    replica would be restarted at once."""
    deadline = asyncio.get_running_loop().time() + timeout
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    for service_name in ("healthagent.v1.HealthAgent",):
        while True:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service_name))
            if answer.status == expected:
                break
            assert asyncio.get_running_loop().time() < deadline, f"health stayed {answer.status}"
            await asyncio.sleep(0.05)
