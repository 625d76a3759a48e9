"""The upstream calls off the streaming path, timed: cold minting and JWKS fetches.

    python -m bench.http_clients --out /tmp/http-clients

- Cold minting: `healthagent serve` in front of the emulator (each its own process) with
  HEALTHAGENT_SESSION_POOL_SIZE=1 and a new user for every call, so each MintSession mints
  upstream through the service's httpx client. For reference, in alternating rounds of the same
  run, this process sends the same mint straight to the emulator with a plain httpx client.
  Reported: latency as the caller sees it; the service's CPU per MintSession beside the
  emulator's for the same mints (their ratio moves little with the machine's load); and this
  process's CPU per direct mint, what one plain httpx client costs at that concurrency.
- JWKS: `JwksCache.key_for` with a cache that is always stale, so each call fetches and parses
  the key set over HTTP from a JWKS server in a child process: through the client the service
  builds, and through a plain `httpx.AsyncClient`, in alternating rounds. CPU is this process's.

Loopback only; every phase is bounded by a count and by --phase-seconds, every call by a
deadline. The machine's load moves the absolute figures; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.processes import EmulatorProcess, ServeProcess, start_emulator_process, start_serve
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.config import Settings
from healthagent_service.emulator.http_server import HttpRequest, HttpResponse, HttpServer
from healthagent_service.security.auth import JwksCache
from healthagent_service.upstream.chatkit import CHATKIT_BETA_HEADER
from healthagent_service.upstream.http_clients import ShardedHttpClient

WORKFLOW = "wf_bench_http"
JWKS_KID = "bench-rsa"
CALL_TIMEOUT_SECONDS = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def service_http_client() -> tuple[httpx.AsyncClient, Callable[[], Awaitable[None]]]:
    """The client `create_server` gives the JWKS cache, built as it builds it (default
    settings), and how to close it."""
    defaults = Settings.model_fields
    clients = ShardedHttpClient(
        timeout=httpx.Timeout(
            connect=defaults["upstream_connect_timeout_seconds"].default,
            read=defaults["upstream_read_timeout_seconds"].default,
            write=30.0,
            pool=30.0,
        ),
        max_connections=defaults["upstream_max_connections"].default,
    )
    return clients.first, clients.aclose


@dataclass
class Timing:
    """One side of a comparison: the calls made and what they took."""

    calls: int = 0
    errors: int = 0
    median_ms: float = 0.0
    p99_ms: float = 0.0
    # cold minting: the service's (through it) or this process's (direct); JWKS: this process's
    cpu_ms_per_call: float = 0.0
    reference_cpu_ms_per_call: float = 0.0  # cold minting: the emulator's, for the same calls


@dataclass
class Comparison:
    """The measured side and its reference, in the same run, and their ratios."""

    name: str
    concurrency: int
    measured: Timing
    reference: Timing
    median_ratio: float = 0.0
    p99_ratio: float = 0.0
    cpu_ratio: float = 0.0


@dataclass
class HttpClientsReport:
    command: str
    comparisons: list[Comparison] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Samples:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_seconds: float = 0.0
    reference_cpu_seconds: float = 0.0

    def timing(self) -> Timing:
        calls = len(self.latencies_ms)
        if not calls:
            return Timing(errors=self.errors)
        return Timing(
            calls=calls,
            errors=self.errors,
            median_ms=round(percentile(self.latencies_ms, 0.5), 3),
            p99_ms=round(percentile(self.latencies_ms, 0.99), 3),
            cpu_ms_per_call=round(self.cpu_seconds * 1000 / calls, 3),
            reference_cpu_ms_per_call=round(self.reference_cpu_seconds * 1000 / calls, 3),
        )


def compare(name: str, concurrency: int, measured: Samples, reference: Samples) -> Comparison:
    mine, theirs = measured.timing(), reference.timing()
    result = Comparison(name, concurrency, mine, theirs)
    if theirs.median_ms and theirs.p99_ms:
        result.median_ratio = round(mine.median_ms / theirs.median_ms, 3)
        result.p99_ratio = round(mine.p99_ms / theirs.p99_ms, 3)
    if name == "cold_mint" and mine.reference_cpu_ms_per_call:
        # the service's CPU per mint over the emulator's for the same mints
        result.cpu_ratio = round(mine.cpu_ms_per_call / mine.reference_cpu_ms_per_call, 3)
    elif theirs.cpu_ms_per_call:
        result.cpu_ratio = round(mine.cpu_ms_per_call / theirs.cpu_ms_per_call, 3)
    return result


async def timed_calls(
    call: Callable[[int], Awaitable[None]],
    count: int,
    concurrency: int,
    deadline: float,
    samples: Samples,
) -> None:
    """`count` calls, `concurrency` at a time, none started after `deadline` (monotonic)."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                await call(index)
            except (grpc.aio.AioRpcError, httpx.HTTPError, TimeoutError):
                samples.errors += 1
                continue
            samples.latencies_ms.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


class ColdMints:
    """MintSession through the service, and the same mint sent straight to the emulator."""

    def __init__(self, server: ServeProcess, emulator: EmulatorProcess) -> None:
        self._server = server
        self._emulator = emulator
        self._channel = grpc.aio.insecure_channel(server.address)
        self._stub = pb_grpc.HealthAgentStub(self._channel)
        self._direct = httpx.AsyncClient(
            timeout=CALL_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            trust_env=False,
        )
        self._serial = 0

    def _user(self) -> str:
        self._serial += 1
        return f"cold-{self._serial}"

    async def through_service(self, index: int) -> None:
        await self._stub.MintSession(
            pb.MintSessionRequest(user=self._user()), timeout=CALL_TIMEOUT_SECONDS
        )

    async def direct(self, index: int) -> None:
        response = await self._direct.post(
            f"{self._emulator.base_url}/chatkit/sessions",
            json={"user": self._user(), "workflow": {"id": WORKFLOW}},
            headers={
                "Authorization": f"Bearer {self._emulator.api_key}",
                CHATKIT_BETA_HEADER[0]: CHATKIT_BETA_HEADER[1],
            },
        )
        response.raise_for_status()

    async def round(self, count: int, concurrency: int, deadline: float, into: Samples) -> None:
        """One round of service mints, with the two processes' CPU counted over it."""
        service_cpu = process_cpu_seconds(self._server.process.pid)
        emulator_cpu = process_cpu_seconds(self._emulator.process.pid)
        await timed_calls(self.through_service, count, concurrency, deadline, into)
        into.cpu_seconds += process_cpu_seconds(self._server.process.pid) - service_cpu
        into.reference_cpu_seconds += process_cpu_seconds(self._emulator.process.pid) - emulator_cpu

    async def close(self) -> None:
        await self._channel.close()
        await self._direct.aclose()


async def measure_cold_mints(
    server: ServeProcess, emulator: EmulatorProcess, options: argparse.Namespace
) -> list[Comparison]:
    comparisons = []
    mints = ColdMints(server, emulator)
    try:
        warmup_deadline = time.monotonic() + options.phase_seconds
        await timed_calls(mints.through_service, options.warmup, 4, warmup_deadline, Samples())
        await timed_calls(mints.direct, options.warmup, 4, warmup_deadline, Samples())
        for concurrency in options.concurrency:
            service, direct = Samples(), Samples()
            deadline = time.monotonic() + options.phase_seconds
            per_round = max(1, options.mints // options.rounds)
            for _ in range(options.rounds):
                cpu = time.process_time()
                await timed_calls(mints.direct, per_round, concurrency, deadline, direct)
                direct.cpu_seconds += time.process_time() - cpu
                await mints.round(per_round, concurrency, deadline, service)
            comparisons.append(compare("cold_mint", concurrency, service, direct))
            print(json.dumps(asdict(comparisons[-1])), file=sys.stderr, flush=True)
    finally:
        await mints.close()
    return comparisons


async def jwks_round(
    cache_for: Callable[[], JwksCache], count: int, deadline: float, into: Samples
) -> None:
    cache = cache_for()

    async def fetch(index: int) -> None:
        await cache.key_for(JWKS_KID, "RS256")

    cpu = time.process_time()
    await timed_calls(fetch, count, 1, deadline, into)
    into.cpu_seconds += time.process_time() - cpu


async def measure_jwks(url: str, options: argparse.Namespace) -> Comparison:
    service_client, close_service_client = service_http_client()
    plain = httpx.AsyncClient(timeout=CALL_TIMEOUT_SECONDS, trust_env=False)
    try:

        def cache(client: httpx.AsyncClient) -> Callable[[], JwksCache]:
            # stale at once and no refresh floor: every key_for fetches
            return lambda: JwksCache(url, client, ttl_seconds=1e-9, min_refresh_seconds=0.0)

        deadline = time.monotonic() + options.phase_seconds
        await jwks_round(cache(service_client), options.warmup, deadline, Samples())
        await jwks_round(cache(plain), options.warmup, deadline, Samples())
        measured, reference = Samples(), Samples()
        deadline = time.monotonic() + options.phase_seconds
        per_round = max(1, options.jwks_fetches // options.rounds)
        for _ in range(options.rounds):
            await jwks_round(cache(plain), per_round, deadline, reference)
            await jwks_round(cache(service_client), per_round, deadline, measured)
        comparison = compare("jwks_fetch", 1, measured, reference)
        print(json.dumps(asdict(comparison)), file=sys.stderr, flush=True)
        return comparison
    finally:
        await close_service_client()
        await plain.aclose()


def start_jwks_server() -> tuple[subprocess.Popen[bytes], str]:
    """`serve_jwks` in a child process (its CPU is not this process's), and its URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.http_clients", "--serve-jwks"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None
    port = json.loads(server.stdout.readline())["port"]
    return server, f"http://127.0.0.1:{port}/jwks.json"


async def serve_jwks() -> None:
    """A JWKS endpoint with one RSA key; prints its port, serves until stdin closes."""
    public = jwt.algorithms.RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(), as_dict=True
    )
    body = json.dumps({"keys": [{**public, "kid": JWKS_KID, "alg": "RS256", "use": "sig"}]})

    async def handle(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, [("content-type", "application/json")], body.encode())

    server = HttpServer(handle)
    port = await server.start("127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()


def markdown(report: HttpClientsReport) -> str:
    """The comparisons as a table. Cold minting's CPU ratio is the service's over the
    emulator's for the same mints; JWKS's, the service's client over the plain one."""
    lines = [
        "| figure | concurrency | calls | median ms | p99 ms | CPU ms/call | emulator CPU"
        " ms/call | reference median ms | reference p99 ms | reference CPU ms/call |"
        " ratio median | ratio p99 | ratio CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report.comparisons:
        mine, theirs = c.measured, c.reference
        emulator = f"{mine.reference_cpu_ms_per_call:.3f}" if c.name == "cold_mint" else "-"
        lines.append(
            f"| {c.name} | {c.concurrency} | {mine.calls} | {mine.median_ms:.2f}"
            f" | {mine.p99_ms:.2f} | {mine.cpu_ms_per_call:.3f} | {emulator}"
            f" | {theirs.median_ms:.2f} | {theirs.p99_ms:.2f} | {theirs.cpu_ms_per_call:.3f}"
            f" | {c.median_ratio:.2f} | {c.p99_ratio:.2f} | {c.cpu_ratio:.2f} |"
        )
    return "\n".join(lines)


def run(options: argparse.Namespace) -> HttpClientsReport:
    report = HttpClientsReport(" ".join(["python -m bench.http_clients", *sys.argv[1:]]))
    emulator = start_emulator_process(chunk_delay_ms="0", workflow=WORKFLOW)
    try:
        server = start_serve(
            **emulator.service_env(WORKFLOW),
            HEALTHAGENT_SESSION_POOL_SIZE="1",
            HEALTHAGENT_RATE_LIMIT_PER_MINUTE="0",
            HEALTHAGENT_LOG_LEVEL="warning",
        )
        try:
            report.comparisons.extend(asyncio.run(measure_cold_mints(server, emulator, options)))
        finally:
            server.terminate()
    finally:
        emulator.stop()
    jwks_server, url = start_jwks_server()
    try:
        report.comparisons.append(asyncio.run(measure_jwks(url, options)))
    finally:
        assert jwks_server.stdin is not None
        jwks_server.stdin.close()
        jwks_server.wait(10)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mints", type=int, default=1500, help="cold mints per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--jwks-fetches", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3, help="alternations with the reference")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--phase-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve-jwks", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> HttpClientsReport | None:
    options = parse_args(argv)
    if options.serve_jwks:
        asyncio.run(serve_jwks())
        return None
    report = run(options)
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "http_clients.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
