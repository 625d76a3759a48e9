"""The gateway hop (`serve --http`) beside direct gRPC: what gRPC-Web and the seeds' SSE add to
a chunk, in latency and in `serve`'s CPU.

    python -m bench.gateway --out docs/benchmarks

One emulator process (the ChatKit side) and one `healthagent serve --http` in front of it, set
as for any load test (bench.performance's `load_test_env`: per-user limits off, log level
warning). Three kinds of client, each driving `--streams` concurrent streams of the paced
phase's turns (`[chunks=N] [pace=P] [stamp]`, back to back for `--seconds`, starts staggered
over a turn):

- `grpc`: `Chat` on `serve`'s gRPC port (bench.clients' `GrpcTurns`): the direct path;
- `grpc-web`: `Chat` over gRPC-Web, binary, HTTP/1.1, one keep-alive connection a stream
  (`GrpcWebTurns`): the listener forwards it to the gRPC server over loopback, in `serve`;
- `sse`: the seeds' contract, `POST /functions/v1/health-agent` with `stream: true`
  (`SeedSseTurns`), forwarded the same way.

The emulator writes its send time (CLOCK_MONOTONIC, which every process here shares) into each
chunk, so a chunk's latency runs from the emulator to the client on every path, and what the
gateway adds is a gateway kind's percentile less the gRPC kind's. The kinds run in `--rounds`
rounds, the order rotated each round (each kind first, second and third once in three rounds),
each round of each kind with fresh clients (warmed with one short turn a stream), so a CPU
ratio is the median of the rounds' own ratios, each of two runs in the same round. CPU is user
plus system from /proc: of `serve` (the gRPC server and, for the gateway kinds, the listener,
which runs in it: the figure the target compares), of the emulator and of this client; the
machine's busy cores meanwhile (`/proc/stat`), its neighbours' included.

Loopback only; each round of each kind lasts `--seconds` plus at most one turn. Writes
`gateway.json` to `--out` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.agent_path import load_average, machine_cpu_seconds
from bench.cli import add_seed_and_out, check_names, write_report
from bench.clients import GrpcTurns, GrpcWebTurns, SeedSseTurns, TurnClient, TurnSample
from bench.performance import (
    CHUNKS,
    WORKFLOW,
    Round,
    cpu_seconds,
    load_test_env,
    own_cpu_seconds,
    paced_run,
    per_chunk_us,
    percentiles,
    phase_result,
    system_cpu_seconds,
    tree_cpu_seconds,
)
from bench.report import PhaseResult, machine
from harness.processes import (
    EmulatorProcess,
    ServeProcess,
    free_port,
    start_emulator_process,
    start_serve,
)

KINDS = ("grpc", "grpc-web", "sse")
DIRECT = "grpc"
STREAMS = 100
PACE_MS = 50  # bench.performance's paced phase at 100 streams (and bench.agent_path's)
SECONDS = 30.0
ROUNDS = 3
TARGET = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "cpu_ratio": 1.5, "errors": 0}


@dataclass
class Load:
    """How busy the machine was during one kind's rounds, in cores: every process (ours and
    the neighbours'), the neighbours' alone (busy less what serve, the emulator and this client
    spent), and stolen by the hypervisor."""

    seconds: float = 0.0
    busy: float = 0.0
    ours: float = 0.0
    steal: float = 0.0

    def add(self, other: Load) -> None:
        self.seconds += other.seconds
        self.busy += other.busy
        self.ours += other.ours
        self.steal += other.steal

    def cores(self) -> dict[str, float]:
        if not self.seconds:
            return {"machine_busy": 0.0, "neighbours_busy": 0.0, "steal": 0.0}
        return {
            "machine_busy": round(self.busy / self.seconds, 2),
            "neighbours_busy": round(max(0.0, self.busy - self.ours) / self.seconds, 2),
            "steal": round(self.steal / self.seconds, 2),
        }


@dataclass
class KindResult:
    """One kind of client over every round: its paced phase (PhaseResult: `server` is `serve`,
    `client` this process), and what it adds to the direct gRPC path's figures."""

    kind: str
    paced: PhaseResult
    # this kind's percentile less the direct path's, all rounds together (0 for grpc itself)
    added_chunk_latency_ms: dict[str, float] = field(default_factory=dict)
    added_first_chunk_latency_ms: dict[str, float] = field(default_factory=dict)
    # every chunk p50 / p99 / max of each round, in the order the rounds ran
    rounds_chunk_latency: list[dict[str, float | int]] = field(default_factory=list)
    # serve's CPU per chunk over the direct path's in the same round, and their median
    rounds_cpu_ratio: list[float] = field(default_factory=list)
    cpu_ratio: float = 0.0
    added_serve_cpu_us_per_chunk: float = 0.0  # over the direct path's, all rounds together
    # the kernel's part of serve's CPU a chunk (its socket writes and reads, mostly)
    serve_system_cpu_us_per_chunk: float = 0.0
    warm_errors: dict[str, int] = field(default_factory=dict)
    error_details: dict[str, str] = field(default_factory=dict)  # one message per error
    load_cores: dict[str, float] = field(default_factory=dict)
    rounds_neighbours_busy_cores: list[float] = field(default_factory=list)


@dataclass
class GatewayReport:
    machine: dict[str, Any]
    command: str
    streams: int
    pace_ms: int
    chunks_per_turn: int
    seconds: float
    rounds: int
    order: list[list[str]] = field(default_factory=list)  # the kinds' order, round by round
    kinds: list[KindResult] = field(default_factory=list)
    serve_seconds_to_ready: float = 0.0
    load_average_before: float = 0.0
    load_average_after: float = 0.0
    targets: dict[str, Any] = field(default_factory=dict)
    serve_log_tail: str = ""


def http_env(address: str) -> dict[str, str]:
    return {"HEALTHAGENT_HTTP_LISTEN": address}


def client_for(kind: str, serve: ServeProcess, http_address: str, streams: int) -> TurnClient:
    if kind == "grpc":
        return GrpcTurns(serve.address, streams)
    if kind == "grpc-web":
        return GrpcWebTurns(http_address, streams)
    return SeedSseTurns(http_address, streams)


def _errors(samples: list[TurnSample]) -> tuple[dict[str, int], dict[str, str]]:
    counts: Counter[str] = Counter()
    details: dict[str, str] = {}
    for sample in samples:
        if sample.error is not None:
            counts[sample.error] += 1
            details.setdefault(sample.error, sample.detail[:300])
    return dict(counts), details


@dataclass
class Measured:
    """One round of one kind."""

    kind: str
    round: Round
    warm: list[TurnSample]
    load: Load
    serve_system_cpu: float = 0.0  # of round.server_cpu


async def measure_round(
    kind: str,
    serve: ServeProcess,
    http_address: str,
    emulator: EmulatorProcess,
    options: argparse.Namespace,
) -> Measured:
    """Fresh clients of `kind`, warmed with a short turn a stream, then the paced turns for
    `options.seconds`, with serve's, the emulator's, this client's and the machine's CPU."""
    users = [f"gateway-{i}" for i in range(options.streams)]
    client = client_for(kind, serve, http_address, options.streams)
    serve_pid, emulator_pid = serve.process.pid, emulator.process.pid
    try:
        await client.prepare(users)
        warm = list(
            await asyncio.gather(
                *(client.turn(i, user, "[chunks=2] [stamp]") for i, user in enumerate(users))
            )
        )
        before = (tree_cpu_seconds(serve_pid), cpu_seconds(emulator_pid), own_cpu_seconds())
        system_before = system_cpu_seconds(serve_pid)
        machine_before = machine_cpu_seconds()
        started = time.monotonic()
        run = paced_run(options.seconds, options.chunks, options.pace_ms, options.seed)
        samples = await run(client, users)
        seconds = time.monotonic() - started
        machine_after = machine_cpu_seconds()
        spent = (
            tree_cpu_seconds(serve_pid) - before[0],
            cpu_seconds(emulator_pid) - before[1],
            own_cpu_seconds() - before[2],
        )
        serve_system = system_cpu_seconds(serve_pid) - system_before
    finally:
        await client.close()
    load = Load(
        seconds,
        machine_after[0] - machine_before[0],
        sum(spent),
        machine_after[1] - machine_before[1],
    )
    return Measured(kind, Round(samples, seconds, *spent), warm, load, serve_system)


def _ratio(ours: Round, direct: Round) -> float | None:
    if not (ours.chunks and direct.chunks and direct.server_cpu):
        return None
    return round((ours.server_cpu / ours.chunks) / (direct.server_cpu / direct.chunks), 3)


def _added(ours: dict[str, float | int], direct: dict[str, float | int]) -> dict[str, float]:
    return {
        name: round(float(ours[name]) - float(direct[name]), 3)
        for name in ("p50_ms", "p99_ms", "max_ms")
    }


def kind_results(kinds: list[str], runs: list[list[Measured]], streams: int) -> list[KindResult]:
    """Every kind's rounds as one result each, with the gateway's additions to the direct
    path's figures (when the direct path ran)."""
    by_kind: dict[str, list[Measured]] = {kind: [] for kind in kinds}
    for one_round in runs:
        for run in one_round:
            by_kind[run.kind].append(run)
    direct_rounds = {
        index: m.round
        for index, one_round in enumerate(runs)
        for m in one_round
        if m.kind == DIRECT
    }
    results: list[KindResult] = []
    for kind in kinds:
        measured = by_kind[kind]
        result = KindResult(kind, phase_result(kind, streams, "paced", [m.round for m in measured]))
        result.rounds_chunk_latency = [percentiles(_latencies(m.round)) for m in measured]
        result.serve_system_cpu_us_per_chunk = per_chunk_us(
            sum(m.serve_system_cpu for m in measured), result.paced.chunks
        )
        result.warm_errors = _errors([s for m in measured for s in m.warm])[0]
        result.error_details = _errors([s for m in measured for s in m.round.samples])[1]
        load = Load()
        for m in measured:
            load.add(m.load)
            result.rounds_neighbours_busy_cores.append(m.load.cores()["neighbours_busy"])
        result.load_cores = load.cores()
        # the same round's direct run beside each of this kind's
        ratios = []
        for index, one_round in enumerate(runs):
            ours = next((m.round for m in one_round if m.kind == kind), None)
            if ours is not None and index in direct_rounds:
                ratio = _ratio(ours, direct_rounds[index])
                if ratio is not None:
                    ratios.append(ratio)
        result.rounds_cpu_ratio = ratios
        result.cpu_ratio = round(statistics.median(ratios), 2) if ratios else 0.0
        results.append(result)
    direct = next((r for r in results if r.kind == DIRECT), None)
    if direct is not None and direct.paced.chunks:
        for result in results:
            if not result.paced.chunks:
                continue
            p, d = result.paced, direct.paced
            result.added_chunk_latency_ms = _added(p.chunk_latency, d.chunk_latency)
            result.added_first_chunk_latency_ms = _added(
                p.first_chunk_latency, d.first_chunk_latency
            )
            result.added_serve_cpu_us_per_chunk = round(
                p.server_cpu_us_per_chunk - d.server_cpu_us_per_chunk, 2
            )
    return results


def _latencies(measured: Round) -> list[int]:
    return [
        received - sent
        for sample in measured.samples
        for sent, received in zip(sample.sent_ns, sample.received_ns, strict=True)
    ]


def compare(report: GatewayReport) -> dict[str, Any]:
    """The issue's targets for each gateway kind: every chunk's added p50 and p99 over the
    direct path's, serve's CPU a chunk over the direct path's (median of the rounds' ratios),
    and no errors."""
    out: dict[str, Any] = {
        "target": "added to every chunk p50 <= 1 ms, p99 <= 5 ms; serve CPU per chunk <= 1.5x"
        " the direct gRPC path's (median of the rounds' ratios); 0 errors"
    }
    for result in report.kinds:
        if result.kind == DIRECT or not result.added_chunk_latency_ms:
            continue
        added = result.added_chunk_latency_ms
        errors = sum(result.paced.errors.values())
        checks = {
            "added_p50": added["p50_ms"] <= TARGET["added_p50_ms"],
            "added_p99": added["p99_ms"] <= TARGET["added_p99_ms"],
            "cpu_ratio": bool(result.rounds_cpu_ratio) and result.cpu_ratio <= TARGET["cpu_ratio"],
            "errors": errors <= TARGET["errors"],
        }
        out[result.kind] = {
            "added_p50_ms": added["p50_ms"],
            "added_p99_ms": added["p99_ms"],
            "cpu_ratio": result.cpu_ratio,
            "errors": errors,
            "met": checks,
            "all_met": all(checks.values()),
        }
    return out


def markdown(report: GatewayReport) -> str:
    lines = [
        f"{report.streams} streams, turns of {report.chunks_per_turn} chunks {report.pace_ms} ms"
        f" apart, {report.rounds} rounds of {report.seconds:g} s a kind; order by round: "
        + "; ".join(", ".join(order) for order in report.order)
        + ".",
        "",
        "| kind | turns | chunks | chunks/s | every chunk p50 / p99 / max ms"
        " | added p50 / p99 ms | first chunk p50 / p99 ms | added first p50 / p99 ms | errors"
        " | CPU us/chunk: serve (its system part), emulator, client"
        " | serve CPU vs grpc, by round (median)"
        " | machine busy / neighbours / steal (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.kinds:
        p = r.paced
        every, first = p.chunk_latency, p.first_chunk_latency
        added, added_first = r.added_chunk_latency_ms, r.added_first_chunk_latency_ms
        errors = ", ".join(f"{n} {code}" for code, n in p.errors.items()) or "0"
        ratios = ", ".join(f"{x:.2f}" for x in r.rounds_cpu_ratio)
        load = r.load_cores
        lines.append(
            f"| {r.kind} | {p.turns:,} | {p.chunks:,} | {p.chunks_per_second:,.0f}"
            f" | {every['p50_ms']} / {every['p99_ms']} / {every['max_ms']}"
            f" | {added.get('p50_ms', '-')} / {added.get('p99_ms', '-')}"
            f" | {first['p50_ms']} / {first['p99_ms']}"
            f" | {added_first.get('p50_ms', '-')} / {added_first.get('p99_ms', '-')}"
            f" | {errors}"
            f" | {p.server_cpu_us_per_chunk:.0f} ({r.serve_system_cpu_us_per_chunk:.0f}),"
            f" {p.emulator_cpu_us_per_chunk:.0f},"
            f" {p.client_cpu_us_per_chunk:.0f}"
            f" | {ratios} ({r.cpu_ratio:.2f}x)"
            f" | {load.get('machine_busy')} / {load.get('neighbours_busy')} / {load.get('steal')} |"
        )
    return "\n".join(lines)


def round_order(index: int, kinds: list[str]) -> list[str]:
    """The kinds rotated by the round's index: in len(kinds) rounds each runs in every place."""
    shift = index % len(kinds)
    return kinds[shift:] + kinds[:shift]


async def run_gateway(options: argparse.Namespace) -> GatewayReport:
    report = GatewayReport(
        machine(),
        " ".join(["python -m bench.gateway", *sys.argv[1:]]),
        options.streams,
        options.pace_ms,
        options.chunks,
        options.seconds,
        options.rounds,
    )
    emulator = start_emulator_process(chunk_delay_ms="0", workflow=WORKFLOW)
    runs: list[list[Measured]] = []
    try:
        http_address = f"127.0.0.1:{free_port()}"
        serve = start_serve(**load_test_env(emulator), **http_env(http_address))
        report.serve_seconds_to_ready = round(serve.seconds_to_serving, 2)
        pids = {"serve": serve.process.pid, "emulator": emulator.process.pid}
        print(json.dumps({"pids": pids, "http": http_address}), file=sys.stderr, flush=True)
        try:
            report.load_average_before = load_average()
            for index in range(options.rounds):
                order = round_order(index, options.kinds)
                report.order.append(order)
                one_round = []
                for kind in order:
                    measured = await measure_round(kind, serve, http_address, emulator, options)
                    one_round.append(measured)
                    line = {
                        "round": index,
                        "kind": kind,
                        "chunks": measured.round.chunks,
                        "errors": _errors(measured.round.samples)[0],
                        "serve_cpu_us_per_chunk": round(
                            measured.round.server_cpu / max(1, measured.round.chunks) * 1e6, 1
                        ),
                        "chunk_latency": percentiles(_latencies(measured.round)),
                        "load_cores": measured.load.cores(),
                    }
                    print(json.dumps(line), file=sys.stderr, flush=True)
                runs.append(one_round)
            report.load_average_after = load_average()
        finally:
            serve.terminate()
            report.serve_log_tail = serve.log()[-2000:]
    finally:
        with contextlib.suppress(Exception):
            emulator.stop()
    report.kinds = kind_results(options.kinds, runs, options.streams)
    report.targets = compare(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--chunks", type=int, default=CHUNKS, help="chunks a turn")
    parser.add_argument("--pace-ms", type=int, default=PACE_MS, help="between chunks")
    parser.add_argument(
        "--seconds", type=float, default=SECONDS, help="per kind and round, at least"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--kinds",
        type=lambda s: s.split(","),
        default=list(KINDS),
        help="which kinds of client (grpc, grpc-web, sse); the added figures need grpc",
    )
    add_seed_and_out(parser)
    options = parser.parse_args(argv)
    check_names(parser, options.kinds, KINDS, "kinds")
    return options


def main(argv: list[str] | None = None) -> GatewayReport:
    options = parse_args(argv)
    report = asyncio.run(run_gateway(options))
    write_report(report, options.out / "gateway.json", markdown(report), report.targets)
    return report


if __name__ == "__main__":
    main()
