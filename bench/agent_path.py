"""The agent path beside the emulator path: what each hop adds to a chunk, and what it costs.

    python -m bench.agent_path --out docs/benchmarks

One emulator process is the model on both paths:

- `emulator`: `healthagent serve` in front of the emulator's ChatKit API (bench.performance's
  `healthagent` target): one hop;
- `agent`: `healthagent agent` in its own process (threads in SQLite in a temporary data dir),
  whose model is the emulator's Responses API (`POST /v1/responses`), and `healthagent serve`
  with HEALTHAGENT_UPSTREAM=agent pointed at it: two hops.

Each path in turn (its processes started for it, stopped after it): `--streams` concurrent
Chat streams read by `GrpcTurns`, warmed with two short turns each, then turns back to back
for `--seconds`, starts staggered over a turn (bench.performance's paced phase), each turn
`[chunks=N] [pace=P] [stamp]`: the emulator writes its send time (CLOCK_MONOTONIC, which every
process here shares) into each delta, so a chunk's latency runs from the model's send to the
gRPC client, through both hops on the agent path. Also errors by status code, CPU seconds per
chunk of `serve`, of the agent server, of the emulator and of this client, resident memory
before and at the peak, and how busy the machine was meanwhile (its neighbours included).

Loopback only; each path lasts `--seconds` plus at most one turn. Writes `agent-path.json`
to `--out` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cli import add_seed_and_out, check_names, progress, write_report
from bench.clients import GrpcTurns, TurnSample
from bench.performance import (
    CHUNKS,
    CLOCK_TICKS,
    WORKFLOW,
    Round,
    load_test_env,
    own_cpu_seconds,
    paced_run,
    per_chunk_us,
    phase_result,
    tree_cpu_seconds,
)
from bench.report import PhaseResult, machine
from harness.processes import (
    AgentServerProcess,
    EmulatorProcess,
    ServeProcess,
    start_agent_server,
    start_emulator_process,
    start_serve,
    tree_rss_bytes,
)

PATHS = ("emulator", "agent")
STREAMS = 100
# 50 ms between deltas of 20 bytes (about 5 tokens each) is 400 bytes, about 100 tokens, a
# second: a fast model's output rate. It is also bench.performance's pace at 100 streams
# (2,000 chunks/s offered), so the emulator path here repeats that phase's healthagent row.
PACE_MS = 50
SECONDS = 60.0
WARM_TURNS = 2  # the agent server's first turn is slow (imports, schemas) and came whole
TARGET = {"p50_ms": 2.0, "p99_ms": 20.0, "errors": 0}
MIB = 2**20


def machine_cpu_seconds() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine so far, all cores (/proc/stat): what
    every process on it ran, and what the hypervisor gave to other machines."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class PathResult:
    """One path: its paced phase (PhaseResult: `server` is `serve`), what the agent server
    spent, memory, and the machine's load."""

    path: str
    paced: PhaseResult
    agent_cpu_us_per_chunk: float = 0.0  # 0 on the emulator path, which has no agent server
    # serve, the agent server and the emulator together: the path a chunk, the client aside
    path_cpu_us_per_chunk: float = 0.0
    warm_errors: dict[str, int] = field(default_factory=dict)
    error_details: dict[str, str] = field(default_factory=dict)  # one message per status code
    rss_idle_mib: dict[str, float] = field(default_factory=dict)  # "serve", "agent"
    rss_peak_mib: dict[str, float] = field(default_factory=dict)
    seconds_to_ready: dict[str, float] = field(default_factory=dict)
    # the whole machine during the phase, in cores: every process (ours and the neighbours'),
    # the neighbours' alone (busy less what this path's processes and this client spent),
    # and stolen by the hypervisor
    machine_busy_cores: float = 0.0
    neighbours_busy_cores: float = 0.0
    steal_cores: float = 0.0
    load_average_before: float = 0.0
    load_average_after: float = 0.0
    log_tail: dict[str, str] = field(default_factory=dict)


@dataclass
class AgentPathReport:
    machine: dict[str, Any]
    command: str
    streams: int
    pace_ms: int
    chunks_per_turn: int
    seconds: float
    paths: list[PathResult] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)


@dataclass
class PathProcesses:
    """One path's servers: `serve`, and on the agent path the agent server behind it."""

    serve: ServeProcess
    agent: AgentServerProcess | None = None

    def pids(self) -> dict[str, int]:
        pids = {"serve": self.serve.process.pid}
        if self.agent is not None:
            pids["agent"] = self.agent.process.pid
        return pids

    def stop(self) -> None:
        try:
            self.serve.terminate()
        finally:
            if self.agent is not None:
                self.agent.terminate()


def start_path(path: str, emulator: EmulatorProcess) -> PathProcesses:
    """The servers of one path, in front of `emulator`, set as for any load test."""
    if path == "emulator":
        return PathProcesses(start_serve(**load_test_env(emulator)))
    agent = start_agent_server(**emulator.agent_env(), HEALTHAGENT_LOG_LEVEL="warning")
    try:
        # the load test's limits and log level, with the agent server as the upstream
        limits = {k: v for k, v in load_test_env(emulator).items() if not k.startswith("OPENAI_")}
        serve = start_serve(**{**limits, **agent.service_env()})
    except BaseException:
        agent.terminate()
        raise
    return PathProcesses(serve, agent)


def _errors(samples: list[TurnSample]) -> tuple[dict[str, int], dict[str, str]]:
    counts: Counter[str] = Counter()
    details: dict[str, str] = {}
    for sample in samples:
        if sample.error is not None:
            counts[sample.error] += 1
            details.setdefault(sample.error, sample.detail[:300])
    return dict(counts), details


async def measure_path(
    path: str, servers: PathProcesses, emulator: EmulatorProcess, options: argparse.Namespace
) -> PathResult:
    """Warm the path, then the paced turns for `options.seconds`, with every process's CPU."""
    users = [f"agent-path-{i}" for i in range(options.streams)]
    client = GrpcTurns(servers.serve.address, options.streams)
    pids = servers.pids()
    warm: list[TurnSample] = []
    try:
        await client.prepare(users)
        for _ in range(WARM_TURNS):
            warm += await asyncio.gather(
                *(client.turn(i, user, "[chunks=2] [stamp]") for i, user in enumerate(users))
            )
        idle = {name: tree_rss_bytes(pid) for name, pid in pids.items()}
        peak = dict(idle)
        sampling = True

        async def sample_memory() -> None:
            while sampling:
                for name, pid in pids.items():
                    peak[name] = max(peak[name], tree_rss_bytes(pid))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_memory())
        load_before = load_average()
        before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        emulator_before, client_before = tree_cpu_seconds(emulator.process.pid), own_cpu_seconds()
        machine_before = machine_cpu_seconds()
        started = time.monotonic()
        run = paced_run(options.seconds, options.chunks, options.pace_ms, options.seed)
        samples = await run(client, users)
        seconds = time.monotonic() - started
        machine_after = machine_cpu_seconds()
        spent = {name: tree_cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        emulator_spent = tree_cpu_seconds(emulator.process.pid) - emulator_before
        client_spent = own_cpu_seconds() - client_before
        sampling = False
        await sampler
    finally:
        await client.close()
    measured = Round(samples, seconds, spent["serve"], emulator_spent, client_spent)
    result = PathResult(path, phase_result(path, options.streams, "paced", [measured]))
    result.paced.pace_ms = options.pace_ms
    chunks = measured.chunks
    result.agent_cpu_us_per_chunk = per_chunk_us(spent.get("agent", 0.0), chunks)
    result.path_cpu_us_per_chunk = per_chunk_us(sum(spent.values()) + emulator_spent, chunks)
    result.warm_errors = _errors(warm)[0]
    result.error_details = _errors(samples)[1]
    result.rss_idle_mib = {name: round(size / MIB, 1) for name, size in idle.items()}
    result.rss_peak_mib = {name: round(size / MIB, 1) for name, size in peak.items()}
    ours = sum(spent.values()) + emulator_spent + client_spent
    busy = machine_after[0] - machine_before[0]
    result.machine_busy_cores = round(busy / seconds, 2)
    result.neighbours_busy_cores = round(max(0.0, busy - ours) / seconds, 2)
    result.steal_cores = round((machine_after[1] - machine_before[1]) / seconds, 2)
    result.load_average_before, result.load_average_after = load_before, load_average()
    return result


def compare(report: AgentPathReport) -> dict[str, Any]:
    """The issue's target (every chunk, model to gRPC client) on each path."""
    out: dict[str, Any] = {
        "target": "every chunk p50 <= 2 ms, p99 <= 20 ms, 0 errors (on the agent path)"
    }
    for result in report.paths:
        latency = result.paced.chunk_latency
        errors = sum(result.paced.errors.values())
        out[result.path] = {
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
            "errors": errors,
            "met": bool(
                latency["n"]
                and latency["p50_ms"] <= TARGET["p50_ms"]
                and latency["p99_ms"] <= TARGET["p99_ms"]
                and errors <= TARGET["errors"]
            ),
        }
    return out


def markdown(report: AgentPathReport) -> str:
    lines = [
        f"{report.streams} streams, turns of {report.chunks_per_turn} chunks {report.pace_ms} ms"
        f" apart, {report.seconds:g} s a path.",
        "",
        "| path | turns | chunks | chunks/s | every chunk p50 / p99 / max ms"
        " | first chunk p50 / p99 / max ms | call to first chunk p50 / p99 ms | errors"
        " | CPU us/chunk: serve, agent, emulator, client | RSS idle / peak MiB: serve, agent"
        " | machine busy / neighbours / steal (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.paths:
        p = r.paced
        every, first, call = p.chunk_latency, p.first_chunk_latency, p.time_to_first_chunk
        errors = ", ".join(f"{n} {code}" for code, n in p.errors.items()) or "0"
        rss = ", ".join(f"{r.rss_idle_mib[n]} / {r.rss_peak_mib[n]}" for n in r.rss_idle_mib)
        lines.append(
            f"| {r.path} | {p.turns:,} | {p.chunks:,} | {p.chunks_per_second:,.0f}"
            f" | {every['p50_ms']} / {every['p99_ms']} / {every['max_ms']}"
            f" | {first['p50_ms']} / {first['p99_ms']} / {first['max_ms']}"
            f" | {call['p50_ms']} / {call['p99_ms']} | {errors}"
            f" | {p.server_cpu_us_per_chunk:.0f}, {r.agent_cpu_us_per_chunk:.0f},"
            f" {p.emulator_cpu_us_per_chunk:.0f}, {p.client_cpu_us_per_chunk:.0f}"
            f" | {rss} | {r.machine_busy_cores} / {r.neighbours_busy_cores} / {r.steal_cores} |"
        )
    return "\n".join(lines)


async def run_paths(options: argparse.Namespace) -> AgentPathReport:
    report = AgentPathReport(
        machine(),
        " ".join(["python -m bench.agent_path", *sys.argv[1:]]),
        options.streams,
        options.pace_ms,
        options.chunks,
        options.seconds,
    )
    emulator = start_emulator_process(chunk_delay_ms="0", workflow=WORKFLOW)
    try:
        for path in options.paths:
            servers = start_path(path, emulator)
            try:
                result = await measure_path(path, servers, emulator, options)
            finally:
                servers.stop()
            result.seconds_to_ready = {
                "serve": round(servers.serve.seconds_to_serving, 2),
                **({"agent": round(servers.agent.seconds_to_serving, 2)} if servers.agent else {}),
            }
            result.log_tail = {"serve": servers.serve.log()[-2000:]}
            if servers.agent is not None:
                result.log_tail["agent"] = servers.agent.log()[-2000:]
            report.paths.append(result)
            progress(result)
    finally:
        with contextlib.suppress(Exception):
            emulator.stop()
    report.targets = compare(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--chunks", type=int, default=CHUNKS, help="chunks a turn")
    parser.add_argument("--pace-ms", type=int, default=PACE_MS, help="between deltas")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per path, at least")
    parser.add_argument(
        "--paths",
        type=lambda s: s.split(","),
        default=list(PATHS),
        help="which paths, in order (emulator, agent)",
    )
    add_seed_and_out(parser)
    options = parser.parse_args(argv)
    check_names(parser, options.paths, PATHS, "paths")
    return options


def main(argv: list[str] | None = None) -> AgentPathReport:
    options = parse_args(argv)
    report = asyncio.run(run_paths(options))
    write_report(report, options.out / "agent-path.json", markdown(report), report.targets)
    return report


if __name__ == "__main__":
    main()
