"""Performance harness: what the HealthAgent hop costs, side by side with its ceiling, in one run.

    python -m bench.performance --out docs/benchmarks

Three targets read the same scripted turn (100 chunks of 20 bytes, each stamped by its sender
with CLOCK_MONOTONIC, which all processes on the machine share):

- `bare`: a bare grpc.aio server with HealthAgent's API and nothing behind it (the ceiling);
- `direct`: a client that mints its own ChatKit session and reads the emulator's SSE itself;
- `healthagent`: `healthagent serve` in front of the emulator, with its embedded SQLite history;
  the per-user rate and stream limits are off and the log level is warning, as for any load test.

For each concurrency (1, 100, 1,000 streams) and target, two phases, each run for `bare` and
`healthagent` in `--rounds` rounds back to back (the order swapped each round; a CPU ratio is
the median of the rounds' own ratios) and for `direct` once:

- throughput: every stream runs turns back to back, unpaced, for `--seconds`; chunks per
  second and CPU seconds per chunk (of the process that streams to the client);
- paced: chunks `concurrency / --paced-rate` seconds apart, at least `--min-pace-ms` (so every
  concurrency offers the same load: well under the bare server's capacity, near HealthAgent's at
  1,000 streams), turns staggered, for at least `--paced-seconds`; the
  latency from sender to client for the first chunk of each turn and for every chunk, and
  resident memory per open stream.

Then MintSession requests per second (warm pool) against the bare unary handler, in alternating
rounds (the median is reported), and
`--open-streams` concurrent Chat streams held open with a chunk every second each.

Loopback only; every phase is bounded in time. Writes `results.json` and PNG plots to `--out`,
and prints Markdown tables (drawn by `bench/report.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cli import add_seed_and_out, progress, write_report
from bench.clients import DirectTurns, GrpcTurns, TurnClient, TurnSample
from bench.report import (
    TARGETS,
    WORKERS_TARGET,
    MintResult,
    OpenStreamsResult,
    PhaseResult,
    Report,
    compare,
    load_report,
    machine,
    markdown,
    plot,
)
from harness.processes import (
    EmulatorProcess,
    ServeProcess,
    free_port,
    rss_bytes,
    start_emulator_process,
    start_serve,
    tree_pids,
    tree_rss_bytes,
    wait_for_workers,
)

WORKFLOW = "wf_bench"
CHUNKS = 100
OPEN_STREAM_USERS = 1000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def system_cpu_seconds(pid: int) -> float:
    """The system (kernel) part of `cpu_seconds`: syscalls, socket writes and reads among them."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(values_ns: list[int]) -> dict[str, float | int]:
    """p50, p99 and max in milliseconds, and the sample count."""
    if not values_ns:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    ordered = sorted(values_ns)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6, 3)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0), "n": len(ordered)}


@dataclass
class Targets:
    """The processes under test and what each one's "server" process is."""

    emulator: EmulatorProcess
    healthagent: ServeProcess
    bare: subprocess.Popen[bytes]
    bare_address: str
    workflow: str = WORKFLOW
    # `serve --workers N`, started for the open-streams phase only (idle, it would still
    # share the machine with every other phase)
    workers: ServeProcess | None = None

    def server_pid(self, target: str) -> int:
        if target == "bare":
            return self.bare.pid
        if target == "healthagent":
            return self.healthagent.process.pid
        if target == WORKERS_TARGET:
            assert self.workers is not None, "start_workers first"
            return self.workers.process.pid
        return self.emulator.process.pid  # direct: the client reads the upstream itself

    def address(self, target: str) -> str:
        """Where a gRPC target listens."""
        if target == "bare":
            return self.bare_address
        if target == WORKERS_TARGET:
            assert self.workers is not None, "start_workers first"
            return self.workers.address
        if target == "healthagent":
            return self.healthagent.address
        raise ValueError(f"{target} is not a gRPC target")

    def start_workers(self, count: int) -> None:
        self.workers = start_serve(**load_test_env(self.emulator), HEALTHAGENT_WORKERS=str(count))
        wait_for_workers(self.workers, count)

    def stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.terminate()
            self.workers = None

    def client(self, target: str, streams: int) -> TurnClient:
        if target != "direct":
            return GrpcTurns(self.address(target), streams)
        return DirectTurns(
            self.emulator.base_url, self.emulator.api_key, self.workflow, streams=streams
        )

    def stop(self) -> None:
        self.stop_workers()
        self.healthagent.terminate()
        self.bare.terminate()
        self.bare.wait(10)
        self.emulator.stop()


def load_test_env(emulator: EmulatorProcess) -> dict[str, str]:
    """`serve` in front of the emulator, as for any load test: no per-user limits, warnings
    only in the log."""
    return {
        **emulator.service_env(WORKFLOW),
        "HEALTHAGENT_RATE_LIMIT_PER_MINUTE": "0",
        "HEALTHAGENT_MAX_STREAMS_PER_USER": "0",
        "HEALTHAGENT_LOG_LEVEL": "warning",
        "HEALTHAGENT_UPSTREAM_MAX_CONNECTIONS": "20000",
    }


def start_targets() -> Targets:
    workflow = WORKFLOW
    emulator = start_emulator_process(chunk_delay_ms="0", workflow=workflow)
    healthagent = start_serve(**load_test_env(emulator))
    bare = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_server", "--listen", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE,
    )
    assert bare.stdout is not None
    address = json.loads(bare.stdout.readline())["address"]
    return Targets(emulator, healthagent, bare, address, workflow)


def summarize(result: PhaseResult, samples: list[TurnSample]) -> None:
    errors: Counter[str] = Counter()
    first: list[int] = []
    every: list[int] = []
    ttfc: list[int] = []
    for sample in samples:
        if sample.error is not None:
            errors[sample.error] += 1
        result.chunks += sample.chunks
        if sample.chunks:
            first.append(sample.received_ns[0] - sample.sent_ns[0])
            ttfc.append(sample.received_ns[0] - sample.started_ns)
            every.extend(r - s for s, r in zip(sample.sent_ns, sample.received_ns, strict=True))
    result.turns = len(samples)
    result.errors = dict(errors)
    result.first_chunk_latency = percentiles(first)
    result.chunk_latency = percentiles(every)
    result.time_to_first_chunk = percentiles(ttfc)


@dataclass
class Round:
    """One run of one phase against one target: its samples and what the processes spent."""

    samples: list[TurnSample]
    seconds: float
    server_cpu: float
    emulator_cpu: float
    client_cpu: float
    rss_per_open_stream_bytes: float = 0.0

    @property
    def chunks(self) -> int:
        return sum(sample.chunks for sample in self.samples)


async def measure(
    targets: Targets,
    target: str,
    concurrency: int,
    run: Callable[[TurnClient, list[str]], Awaitable[list[TurnSample]]],
    *,
    sample_rss: bool = False,
) -> Round:
    """Run one phase once with fresh clients (users already warm) and account for its CPU."""
    users = [f"bench-{i}" for i in range(concurrency)]
    client = targets.client(target, concurrency)
    server, emulator = targets.server_pid(target), targets.emulator.process.pid
    try:
        await client.prepare(users)
        # warm: sessions minted, connections open, as in steady service
        await asyncio.gather(
            *(client.turn(i, user, "[chunks=2] [stamp]") for i, user in enumerate(users))
        )
        rss_idle = rss_bytes(server)
        rss_peak = rss_idle
        sampling = True

        async def sample_memory() -> None:
            nonlocal rss_peak
            while sampling:
                rss_peak = max(rss_peak, rss_bytes(server))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_memory()) if sample_rss else None
        cpu = (cpu_seconds(server), cpu_seconds(emulator), own_cpu_seconds())
        started = time.monotonic()
        samples = await run(client, users)
        measured = Round(
            samples,
            seconds=time.monotonic() - started,
            server_cpu=cpu_seconds(server) - cpu[0],
            emulator_cpu=cpu_seconds(emulator) - cpu[1],
            client_cpu=own_cpu_seconds() - cpu[2],
        )
        sampling = False
        if sampler is not None:
            await sampler
            measured.rss_per_open_stream_bytes = round((rss_peak - rss_idle) / concurrency)
    finally:
        await client.close()
    return measured


def per_chunk_us(seconds: float, chunks: int) -> float:
    return round(seconds / chunks * 1e6, 2) if chunks else 0.0


def phase_result(target: str, concurrency: int, phase: str, rounds: list[Round]) -> PhaseResult:
    """The rounds of one phase as one result: every sample, every chunk and CPU second, the
    largest memory step; and each round's server CPU per chunk."""
    result = PhaseResult(target, concurrency, phase, rounds=len(rounds))
    summarize(result, [sample for measured in rounds for sample in measured.samples])
    result.seconds = round(sum(measured.seconds for measured in rounds), 3)
    result.rss_per_open_stream_bytes = max(m.rss_per_open_stream_bytes for m in rounds)
    result.rounds_server_cpu_us_per_chunk = [
        per_chunk_us(measured.server_cpu, measured.chunks) for measured in rounds
    ]
    if result.chunks:
        result.chunks_per_second = round(result.chunks / result.seconds, 1)
        result.server_cpu_us_per_chunk = per_chunk_us(
            sum(m.server_cpu for m in rounds), result.chunks
        )
        result.emulator_cpu_us_per_chunk = per_chunk_us(
            sum(m.emulator_cpu for m in rounds), result.chunks
        )
        result.client_cpu_us_per_chunk = per_chunk_us(
            sum(m.client_cpu for m in rounds), result.chunks
        )
    return result


def throughput_run(
    seconds: float, chunks: int
) -> Callable[[TurnClient, list[str]], Awaitable[list[TurnSample]]]:
    message = f"[chunks={chunks}] [stamp]"

    async def run(client: TurnClient, users: list[str]) -> list[TurnSample]:
        deadline = time.monotonic() + seconds
        samples: list[TurnSample] = []

        async def worker(index: int, user: str) -> None:
            while time.monotonic() < deadline:
                samples.append(await client.turn(index, user, message))

        await asyncio.gather(*(worker(i, user) for i, user in enumerate(users)))
        return samples

    return run


def paced_run(
    seconds: float, chunks: int, pace_ms: int, seed: int
) -> Callable[[TurnClient, list[str]], Awaitable[list[TurnSample]]]:
    message = f"[chunks={chunks}] [pace={pace_ms}] [stamp]"
    turn_seconds = chunks * pace_ms / 1000

    async def run(client: TurnClient, users: list[str]) -> list[TurnSample]:
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        samples: list[TurnSample] = []

        async def worker(index: int, user: str, offset: float) -> None:
            await asyncio.sleep(offset)  # spread turn starts evenly, as real users arrive
            while True:
                samples.append(await client.turn(index, user, message))
                if time.monotonic() >= deadline:
                    return

        offsets = [rng.uniform(0, min(turn_seconds, seconds)) for _ in users]
        await asyncio.gather(
            *(worker(i, u, o) for i, (u, o) in enumerate(zip(users, offsets, strict=True)))
        )
        return samples

    return run


async def measure_mint(
    targets: Targets, target: str, concurrency: int, seconds: float
) -> MintResult:
    address = targets.address(target)
    client = GrpcTurns(address, concurrency)
    users = [f"mint-{i}" for i in range(concurrency)]
    result = MintResult(target, concurrency)
    errors: Counter[str] = Counter()
    try:
        await client.prepare(users)
        await asyncio.gather(*(client.mint(i, u) for i, u in enumerate(users)))  # warm the pool
        server = targets.server_pid(target)
        cpu = cpu_seconds(server)
        started = time.monotonic()
        deadline = started + seconds

        async def worker(index: int, user: str) -> None:
            while time.monotonic() < deadline:
                try:
                    await client.mint(index, user)
                    result.requests += 1
                except Exception as error:  # counted and reported, never fatal
                    errors[type(error).__name__] += 1

        await asyncio.gather(*(worker(i, u) for i, u in enumerate(users)))
        result.seconds = round(time.monotonic() - started, 3)
        used = cpu_seconds(server) - cpu
    finally:
        await client.close()
    result.errors = dict(errors)
    result.requests_per_second = round(result.requests / result.seconds, 1)
    if result.requests:
        result.server_cpu_us_per_request = round(used / result.requests * 1e6, 2)
    return result


def median_mint(results: list[MintResult]) -> MintResult:
    """The round with the median requests per second, with the rounds' count noted."""
    ordered = sorted(results, key=lambda m: m.requests_per_second)
    chosen = ordered[len(ordered) // 2]
    chosen.rounds = len(results)
    chosen.rounds_rps = [m.requests_per_second for m in results]
    errors: Counter[str] = Counter()
    for result in results:  # every round's, not only the median one's
        errors.update(result.errors)
    chosen.errors = dict(errors)
    return chosen


OPEN_STREAMS_CLIENT = Path(__file__).with_name("open_streams_client.mjs")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (one that ends meanwhile counts 0)."""
    total = 0.0
    for member in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError):
            total += cpu_seconds(member)
    return total


async def run_open_streams_client(
    address: str, streams: int, ramp_seconds: float, message: str, users: int
) -> dict[str, Any]:
    """The Node load client (`open_streams_client.mjs`); its JSON report."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(OPEN_STREAMS_CLIENT),
        address,
        str(streams),
        str(ramp_seconds),
        message,
        str(users),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"open-streams client failed: {err.decode()[-2000:]}")
    report: dict[str, Any] = json.loads(out)
    return report


async def measure_open_streams(
    targets: Targets, target: str, streams: int, chunks_each: int, ramp_seconds: float
) -> OpenStreamsResult:
    """`streams` Chat streams through `target`, started over `ramp_seconds`, each getting a
    chunk every second for `chunks_each` seconds, read by the Node load client."""
    result = OpenStreamsResult(target, streams, chunks_each, ramp_seconds)
    address = targets.address(target)
    server = targets.server_pid(target)
    result.workers = len(tree_pids(server)) - 1 or 1
    users = min(streams, OPEN_STREAM_USERS)
    # warm: a turn per user, so sessions are minted and connections open, as in steady service
    await run_open_streams_client(address, users, 0, "[chunks=1] [stamp]", users)
    result.server_rss_idle_bytes = tree_rss_bytes(server)
    result.server_rss_peak_bytes = result.server_rss_idle_bytes
    emulator = targets.emulator.process.pid
    cpu, emulator_cpu = tree_cpu_seconds(server), cpu_seconds(emulator)
    started = time.monotonic()
    client = asyncio.create_task(
        run_open_streams_client(
            address, streams, ramp_seconds, f"[chunks={chunks_each}] [pace=1000] [stamp]", users
        )
    )
    while not client.done():
        rss = tree_rss_bytes(server)
        result.server_rss_peak_bytes = max(result.server_rss_peak_bytes, rss)
        await asyncio.wait({client}, timeout=0.5)
    report = client.result()
    result.seconds = round(time.monotonic() - started, 3)
    result.server_cpu_seconds = round(tree_cpu_seconds(server) - cpu, 2)
    result.emulator_cpu_seconds = round(cpu_seconds(emulator) - emulator_cpu, 2)
    result.max_open = report["max_open"]
    result.completed = report["completed"]
    result.errors = report["errors"]
    result.chunks = report["chunks"]
    result.chunk_latency = report["chunk_latency"]
    result.first_event_latency = report["first_event_latency"]
    result.client_cpu_seconds = round(report["client_cpu_seconds"], 2)
    return result


async def measure_phase(
    report: Report,
    targets: Targets,
    *,
    concurrency: int,
    phase: str,
    run: Callable[[TurnClient, list[str]], Awaitable[list[TurnSample]]],
    rounds: int,
) -> list[PhaseResult]:
    """One phase at one concurrency: the bare server and HealthAgent in `rounds` rounds back to
    back, the order swapped each round (on a shared machine one minute's CPU per chunk differs
    from the next by a third, two neighbours' much less), and the direct reader once (what an
    app pays without HealthAgent; no ratio reads it). Each target's result, in `TARGETS`
    order; the rounds' CPU ratios go to the report."""
    measured: dict[str, list[Round]] = {target: [] for target in TARGETS}
    for index in range(rounds):
        order = [target for target in TARGETS if target != "direct" or index == 0]
        for target in reversed(order) if index % 2 else order:
            measured[target].append(
                await measure(targets, target, concurrency, run, sample_rss=phase == "paced")
            )
    report.cpu_round_ratios.setdefault(phase, {})[str(concurrency)] = [
        round((ours.server_cpu / ours.chunks) / (bare.server_cpu / bare.chunks), 3)
        for bare, ours in zip(measured["bare"], measured["healthagent"], strict=True)
        if bare.chunks and ours.chunks and bare.server_cpu
    ]
    return [phase_result(target, concurrency, phase, measured[target]) for target in TARGETS]


async def run_all(options: argparse.Namespace) -> Report:
    report = Report(machine(), " ".join(["python -m bench.performance", *sys.argv[1:]]))
    targets = start_targets()
    try:
        for concurrency in options.concurrency:
            pace_ms = max(options.min_pace_ms, round(concurrency * 1000 / options.paced_rate))
            phases = (
                ("throughput", throughput_run(options.seconds, options.chunks), 0),
                (
                    "paced",
                    paced_run(options.paced_seconds, options.chunks, pace_ms, options.seed),
                    pace_ms,
                ),
            )
            for phase, run, pace in phases:
                results = await measure_phase(
                    report,
                    targets,
                    concurrency=concurrency,
                    phase=phase,
                    run=run,
                    rounds=options.rounds,
                )
                for result in results:
                    result.pace_ms = pace
                    report.phases.append(result)
                    progress(result)
        # rounds of the two back to back, the order swapped each round: on a shared machine
        # one minute's rate differs from the next by a third, two neighbours' much less
        rounds: dict[str, list[MintResult]] = {"bare": [], "healthagent": []}
        for index in range(options.mint_rounds):
            order = ("bare", "healthagent") if index % 2 == 0 else ("healthagent", "bare")
            for target in order:
                mint = await measure_mint(
                    targets, target, options.mint_concurrency, options.mint_seconds
                )
                rounds[target].append(mint)
                progress(mint)
        report.mint = [median_mint(results) for results in rounds.values()]
        report.mint_round_ratios = [
            round(ours.requests_per_second / bare.requests_per_second, 3)
            for bare, ours in zip(rounds["bare"], rounds["healthagent"], strict=True)
            if bare.requests_per_second
        ]
        for target in options.open_targets if options.open_streams else []:
            # the bare server too: whether this machine can hold the load at all
            if target == WORKERS_TARGET:
                targets.start_workers(options.workers)
            open_streams = await measure_open_streams(
                targets,
                target,
                options.open_streams,
                options.open_seconds,
                options.open_ramp_seconds,
            )
            targets.stop_workers()
            report.open_streams.append(open_streams)
            progress(open_streams)
    finally:
        targets.stop()
    report.targets = compare(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 100, 1000]
    )
    parser.add_argument("--chunks", type=int, default=CHUNKS)
    # five, as for MintSession: with three, two slow rounds in one phase decide its median,
    # and on this machine one round in four or so is slow
    # (docs/benchmarks.md#benchperformance-about-35-minutes)
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of bare and healthagent in each phase"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="throughput phase length, per round"
    )
    parser.add_argument("--paced-seconds", type=float, default=10.0, help="at least, per round")
    parser.add_argument(
        "--paced-rate", type=float, default=2000.0, help="chunks per second offered when paced"
    )
    parser.add_argument("--min-pace-ms", type=int, default=10)
    parser.add_argument("--mint-concurrency", type=int, default=32)
    parser.add_argument("--mint-seconds", type=float, default=5.0)
    parser.add_argument("--mint-rounds", type=int, default=5)
    parser.add_argument("--open-streams", type=int, default=10_000)
    parser.add_argument(
        "--open-seconds",
        type=int,
        default=90,
        help="chunks per stream, one a second; more than the ramp, so all are open at once",
    )
    parser.add_argument("--open-ramp-seconds", type=float, default=60.0)
    parser.add_argument(
        "--open-targets",
        type=lambda s: s.split(","),
        default=["bare", "healthagent", WORKERS_TARGET],
        help="targets of the open-streams phase",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help=f"processes of `{WORKERS_TARGET}` (default: one per core)",
    )
    add_seed_and_out(parser)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--replot", action="store_true", help="draw the plots of --out/results.json again, no run"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Report:
    options = parse_args(argv)
    if options.replot:
        report = load_report(options.out / "results.json")
        plot(report, options.out)
        print(markdown(report))
        return report
    report = asyncio.run(run_all(options))
    write_report(report, options.out / "results.json", markdown(report), report.targets)
    if not options.no_plots:
        plot(report, options.out)
    return report


if __name__ == "__main__":
    main()
