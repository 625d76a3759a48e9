"""Reliability under load, scaled down: graceful shutdown with 200 streams in flight, a short
soak with injected drops, and cancellations that leave nothing behind."""

from __future__ import annotations

import asyncio
import platform
import signal
import subprocess
import sys
from collections import Counter
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.soak import run_soak
from harness.processes import start_serve
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.memory import limit_malloc_arenas
from tests.support.calls import wait_for
from tests.support.service import Service


async def run_streams_through_sigterm(grace: str, chunks: int) -> tuple[Counter[str], Any]:
    server = start_serve(
        HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="30",
        HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS="2",
        HEALTHAGENT_SHUTDOWN_GRACE_SECONDS=grace,
        HEALTHAGENT_RATE_LIMIT_PER_MINUTE="0",
        HEALTHAGENT_MAX_STREAMS_PER_USER="0",
    )
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.HealthAgentStub(channel)
    started = 0

    async def one(index: int) -> str:
        nonlocal started
        events: list[pb.ChatResponse] = []
        try:
            async for event in stub.Chat(
                pb.ChatRequest(message=f"[chunks={chunks}]", user=f"u{index % 20}")
            ):
                started += not events
                events.append(event)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        count = sum(e.WhichOneof("event") == "chunk" for e in events)
        return (
            "complete"
            if count == chunks and events[-1].WhichOneof("event") == ("response_done")
            else "TRUNCATED_OK"
        )

    streams = [asyncio.create_task(one(i)) for i in range(200)]
    # SIGTERM once all 200 handlers run. grpc.aio dispatches one new call per event-loop turn,
    # so on a loaded machine some calls can still be queued after a fixed sleep; gRPC cancels
    # those at shutdown (CANCELLED) before any handler of ours has seen them.
    await wait_for(lambda: started == 200, timeout=30.0)
    server.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    health: Any = health_pb2_grpc.HealthStub(channel)
    status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # during the drain period
    outcomes = Counter(await asyncio.gather(*streams))
    await asyncio.sleep(0.1)
    async with grpc.aio.insecure_channel(server.address) as late:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.HealthAgentStub(late).MintSession(
                pb.MintSessionRequest(user="late"), timeout=2
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()
    return outcomes, server


@pytest.mark.slow
@pytest.mark.parametrize(
    ("grace", "chunks", "expected"),
    # 100 chunks 30 ms apart end well inside a 20 s grace period; 400 cannot end inside 0.5 s
    [("20", 100, "complete"), ("0.5", 400, "UNAVAILABLE")],
)
async def test_sigterm_with_200_streams_in_flight(grace: str, chunks: int, expected: str) -> None:
    outcomes, server = await run_streams_through_sigterm(grace, chunks)
    assert outcomes == Counter({expected: 200})  # never an answer cut short and called OK
    assert server.process.wait(30) == 0
    log = server.log()
    assert "Traceback" not in log and "shutting down" in log


@pytest.mark.slow
async def test_short_soak_with_injected_drops() -> None:
    report = await run_soak(streams=100, seconds=10, drop_fraction=0.05, warmup_seconds=3)
    assert report.turns > 300 and report.drops_injected > 0
    assert report.silent_truncations == 0 and report.other_errors == {}
    assert report.ok_exact + report.unavailable == report.turns
    assert report.unavailable >= report.drops_injected
    assert report.upstream_streams_open_after == 0  # no leaked upstream request
    assert report.memory_growth < 0.10, report.as_dict()


async def test_cancellations_leave_nothing_behind(
    service: Service, emulator: ChatKitEmulator
) -> None:
    # one turn first, so pooled sessions and connections exist before counting
    [e async for e in service.stub.Chat(pb.ChatRequest(message="warm", user="c"))]
    tasks_before = len(asyncio.all_tasks())
    for index in range(50):
        call = service.stub.Chat(pb.ChatRequest(message="[chunks=100000]", user="c"))
        async for event in call:
            if event.WhichOneof("event") == "chunk":
                break
        call.cancel()
        await wait_for(lambda i=index: emulator.stats.streams_disconnected == i + 1)
    await wait_for(lambda: emulator.stats.streams_open == 0)
    await asyncio.sleep(0.2)
    assert len(asyncio.all_tasks()) <= tasks_before + 2  # no handler or upstream task left
    assert len(service.running.chatkit.pool) == 1  # one pooled session, not one per call
    assert not service.running.servicer._active_chats


def test_malloc_arena_cap_applies_on_glibc() -> None:
    assert limit_malloc_arenas(0) is False  # 0 leaves glibc's default alone
    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas(8) is True  # glibc's own default on a 1-core machine


def test_serve_tunes_the_garbage_collector() -> None:
    # in a child process: the setting is process-wide
    probe = (
        "import gc; from healthagent_service.memory import tune_garbage_collector as t; "
        "t(20000); print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["20000", "True"]
