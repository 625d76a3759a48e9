"""Cancellation latency: how soon after a caller cancels does the upstream see its request
closed? Measured at the emulator (its own clock), over many sequential cancellations.

    python -m bench.cancellation --count 500

Loopback only; bounded by --count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import grpc
import httpx

from harness.processes import start_emulator_process, start_serve
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc


@dataclass
class CancellationReport:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    upstream_streams_open_after: int
    disconnects_seen: int


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_cancellations(count: int) -> CancellationReport:
    """Start a long Chat, wait for its first chunk, cancel, and time the upstream close."""
    emulator = start_emulator_process(chunk_delay_ms="5")
    server = start_serve(
        **emulator.service_env(),
        HEALTHAGENT_LOG_LEVEL="warning",
        HEALTHAGENT_RATE_LIMIT_PER_MINUTE="0",
    )
    stats_url = emulator.base_url.replace("/v1", "/_emulator/stats")
    latencies: list[float] = []
    try:
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            httpx.AsyncClient() as http,
        ):
            stub = pb_grpc.HealthAgentStub(channel)
            for index in range(count):
                call = stub.Chat(pb.ChatRequest(message="[chunks=100000]", user="cancel"))
                async for event in call:
                    if event.WhichOneof("event") == "chunk":
                        break
                cancelled_at = time.monotonic()
                call.cancel()
                deadline = cancelled_at + 10
                while True:
                    stats = (await http.get(stats_url)).json()
                    if stats["streams_disconnected"] > index or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.002)
                latencies.append((stats["last_disconnect_at"] - cancelled_at) * 1000)
            await asyncio.sleep(0.5)
            stats = (await http.get(stats_url)).json()
    finally:
        server.terminate()
        emulator.stop()
    return CancellationReport(
        count=count,
        p50_ms=round(statistics.median(latencies), 2),
        p99_ms=round(percentile(latencies, 0.99), 2),
        max_ms=round(max(latencies), 2),
        upstream_streams_open_after=stats["streams_open"],
        disconnects_seen=stats["streams_disconnected"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    options = parser.parse_args()
    print(json.dumps(asdict(asyncio.run(run_cancellations(options.count))), indent=2))


if __name__ == "__main__":
    main()
