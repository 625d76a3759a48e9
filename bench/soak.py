"""Soak: many concurrent Chat streams against the emulator for a while, some with injected
upstream drops. Every stream must end OK with exactly the text the emulator sent, or
UNAVAILABLE; none may end OK with a truncated answer, no upstream stream may be left open, and
the server's memory must come back to where it started.

    python -m bench.soak --streams 1000 --seconds 60 --drop-fraction 0.05

Loopback only; bounded by --seconds (and a per-call deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import httpx

from harness.processes import (
    start_emulator_process,
    start_serve,
    tree_open_files,
    tree_rss_breakdown,
    tree_rss_bytes,
    wait_for_workers,
)
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.script import plan_reply

CHUNKS = 20
MESSAGE = f"[chunks={CHUNKS}] soak"
DROP_MESSAGE = f"[chunks={CHUNKS}] [drop] soak"
SETTLE_SECONDS = 8.0  # more than the service's memory-trim interval (5 s)


@dataclass
class SoakReport:
    streams: int
    seconds: float
    drop_fraction: float
    warmup_seconds: float
    workers: int = 1
    turns: int = 0
    ok_exact: int = 0
    unavailable: int = 0
    silent_truncations: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)
    drops_injected: int = 0
    upstream_streams_open_after: int = -1
    upstream_streams_disconnected: int = 0
    server_rss_start: int = 0
    server_rss_peak: int = 0
    server_rss_end: int = 0
    server_rss_after_each_round: list[int] = field(default_factory=list)
    server_rss_breakdown_start: dict[str, int] = field(default_factory=dict)
    server_open_files_start: int = 0
    server_open_files_after_each_round: list[int] = field(default_factory=list)
    server_rss_breakdown_after_each_round: list[dict[str, int]] = field(default_factory=list)

    @property
    def memory_growth(self) -> float:
        return self.server_rss_end / self.server_rss_start - 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_growth": round(self.memory_growth, 4)}


async def _turn(stub: pb_grpc.HealthAgentStub, user: str, drop: bool) -> str:
    message = DROP_MESSAGE if drop else MESSAGE
    expected = plan_reply(message).text
    text: list[str] = []
    done = False
    try:
        async for event in stub.Chat(pb.ChatRequest(message=message, user=user), timeout=60):
            kind = event.WhichOneof("event")
            if kind == "chunk":
                text.append(event.chunk.text)
            elif kind == "response_done":
                done = event.response_done.text == expected
    except grpc.aio.AioRpcError as error:
        return "unavailable" if error.code() == grpc.StatusCode.UNAVAILABLE else error.code().name
    if done and "".join(text) == expected:
        return "ok_exact"
    return "silent_truncation"


async def run_soak(
    streams: int,
    seconds: float,
    drop_fraction: float,
    *,
    chunk_delay_ms: float = 50.0,
    seed: int = 7,
    rounds: int = 1,
    warmup_seconds: float = 10.0,
    workers: int = 1,
) -> SoakReport:
    """Run the soak against fresh emulator and server processes; return the figures (memory
    and open files: of the supervisor and its workers, with `workers` > 1)."""
    report = SoakReport(streams, seconds, drop_fraction, warmup_seconds, workers)
    emulator = start_emulator_process(chunk_delay_ms=str(chunk_delay_ms))
    server = start_serve(
        **emulator.service_env(),
        HEALTHAGENT_RATE_LIMIT_PER_MINUTE="0",
        HEALTHAGENT_MAX_STREAMS_PER_USER="0",
        HEALTHAGENT_LOG_LEVEL="warning",
        HEALTHAGENT_WORKERS=str(workers),
    )
    if workers > 1:
        wait_for_workers(server, workers)
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    # the kernel spreads connections, not calls, over workers: a few connections each
    count = max(1, streams // 250) * workers
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("soak.channel", index)])
        for index in range(count)
    ]
    stubs = [pb_grpc.HealthAgentStub(c) for c in channels]
    try:

        async def run_round(seconds: float, sample: bool) -> None:
            deadline = time.monotonic() + seconds

            async def worker(index: int) -> None:
                stub = stubs[index % len(stubs)]
                while time.monotonic() < deadline:
                    drop = rng.random() < drop_fraction
                    report.drops_injected += drop
                    outcomes[await _turn(stub, f"soak-{index % 50}", drop)] += 1

            async def sample_memory() -> None:
                while sample and time.monotonic() < deadline:
                    rss = tree_rss_bytes(server.process.pid)
                    report.server_rss_peak = max(report.server_rss_peak, rss)
                    await asyncio.sleep(0.5)

            await asyncio.gather(sample_memory(), *(worker(i) for i in range(streams)))
            await asyncio.sleep(SETTLE_SECONDS)  # the server goes quiet, gives memory back

        # Warm up under the same load (sessions minted, connections, caches and buffers at
        # their working size), then take the baseline: what the rounds leave above it is what
        # the load left behind.
        await run_round(warmup_seconds, sample=False)
        pid = server.process.pid
        report.server_rss_start = tree_rss_bytes(pid)
        report.server_rss_breakdown_start = tree_rss_breakdown(pid)
        report.server_open_files_start = tree_open_files(pid)
        for _ in range(rounds):
            await run_round(seconds, sample=True)
            report.server_rss_after_each_round.append(tree_rss_bytes(pid))
            report.server_rss_breakdown_after_each_round.append(tree_rss_breakdown(pid))
            report.server_open_files_after_each_round.append(tree_open_files(pid))
        report.server_rss_end = report.server_rss_after_each_round[-1]
        async with httpx.AsyncClient() as http:
            stats = (await http.get(emulator.base_url.replace("/v1", "/_emulator/stats"))).json()
        report.upstream_streams_open_after = stats["streams_open"]
        report.upstream_streams_disconnected = stats["streams_disconnected"]
    finally:
        for channel in channels:
            await channel.close()
        server.terminate()
        emulator.stop()
    report.turns = sum(outcomes.values())
    report.ok_exact = outcomes.pop("ok_exact", 0)
    report.unavailable = outcomes.pop("unavailable", 0)
    report.silent_truncations = outcomes.pop("silent_truncation", 0)
    report.other_errors = dict(outcomes)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--drop-fraction", type=float, default=0.05)
    parser.add_argument("--chunk-delay-ms", type=float, default=50.0)
    parser.add_argument(
        "--warmup-seconds", type=float, default=10.0, help="same load before the baseline"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the load: a leak grows round after round, a high-water mark does not",
    )
    parser.add_argument("--workers", type=int, default=1, help="`serve --workers N`")
    options = parser.parse_args()
    report = asyncio.run(
        run_soak(
            options.streams,
            options.seconds,
            options.drop_fraction,
            chunk_delay_ms=options.chunk_delay_ms,
            rounds=options.rounds,
            warmup_seconds=options.warmup_seconds,
            workers=options.workers,
        )
    )
    print(json.dumps(report.as_dict(), indent=2))


if __name__ == "__main__":
    main()
