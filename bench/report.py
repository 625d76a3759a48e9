"""The performance harness's report: what one run of `bench.performance` measured (written to
`results.json`, read back by `--replot`), the issue's targets taken from it, its Markdown tables
and its plots."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("bare", "direct", "healthagent")
WORKERS_TARGET = "healthagent-workers"  # `serve --workers <cores>`, in the open-streams phase


@dataclass
class PhaseResult:
    """One target at one concurrency in one phase."""

    target: str
    concurrency: int
    phase: str  # "throughput" or "paced"
    seconds: float = 0.0
    turns: int = 0
    chunks: int = 0
    chunks_per_second: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    first_chunk_latency: dict[str, float | int] = field(default_factory=dict)
    chunk_latency: dict[str, float | int] = field(default_factory=dict)
    time_to_first_chunk: dict[str, float | int] = field(default_factory=dict)
    server_cpu_us_per_chunk: float = 0.0
    emulator_cpu_us_per_chunk: float = 0.0
    client_cpu_us_per_chunk: float = 0.0
    pace_ms: float = 0.0
    rss_per_open_stream_bytes: float = 0.0
    # bare and healthagent run in `--rounds` rounds side by side; the figures above are of all
    # rounds together, these of each round
    rounds: int = 1
    rounds_server_cpu_us_per_chunk: list[float] = field(default_factory=list)


@dataclass
class MintResult:
    target: str
    concurrency: int
    seconds: float = 0.0
    requests: int = 0
    requests_per_second: float = 0.0
    server_cpu_us_per_request: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    rounds: int = 1
    rounds_rps: list[float] = field(default_factory=list)


@dataclass
class OpenStreamsResult:
    target: str
    streams: int
    chunks_each: int
    ramp_seconds: float
    max_open: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    chunk_latency: dict[str, float | int] = field(default_factory=dict)
    # from making a call to its first event: how long new calls wait to be taken up
    first_event_latency: dict[str, float | int] = field(default_factory=dict)
    server_rss_idle_bytes: int = 0
    server_rss_peak_bytes: int = 0
    server_cpu_seconds: float = 0.0
    seconds: float = 0.0
    workers: int = 1  # server processes (`serve --workers N`)
    client_cpu_seconds: float = 0.0
    emulator_cpu_seconds: float = 0.0  # 0 for the bare server, which has no upstream


@dataclass
class Report:
    machine: dict[str, Any]
    command: str
    phases: list[PhaseResult] = field(default_factory=list)
    mint: list[MintResult] = field(default_factory=list)
    # HealthAgent's requests/s over the bare server's, round by round (each pair run back to
    # back, so both saw the machine in the same state)
    mint_round_ratios: list[float] = field(default_factory=list)
    # HealthAgent's server CPU per chunk over the bare server's, round by round, by phase and
    # concurrency ("throughput" -> "100" -> ratios)
    cpu_round_ratios: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    open_streams: list[OpenStreamsResult] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)


def compare(report: Report) -> dict[str, Any]:
    """The targets from the issue, each as a ratio or an overhead taken in this run."""
    by = {(p.target, p.concurrency, p.phase): p for p in report.phases}
    out: dict[str, Any] = {}
    paced_100 = by.get(("healthagent", 100, "paced"))
    if paced_100 is not None:
        out["first_chunk_latency_at_100"] = {
            "p50_ms": paced_100.first_chunk_latency["p50_ms"],
            "p99_ms": paced_100.first_chunk_latency["p99_ms"],
            "target": "p50 <= 1 ms, p99 <= 5 ms",
        }
    ratios: dict[str, dict[str, float]] = {"throughput": {}, "paced": {}}
    of_totals: dict[str, dict[str, float]] = {"throughput": {}, "paced": {}}
    for (target, concurrency, phase), result in by.items():
        bare = by.get(("bare", concurrency, phase))
        if target == "healthagent" and bare is not None and bare.server_cpu_us_per_chunk:
            total = round(result.server_cpu_us_per_chunk / bare.server_cpu_us_per_chunk, 2)
            of_totals[phase][str(concurrency)] = total
            # the median of the rounds' own ratios, each of two neighbouring runs
            rounds = report.cpu_round_ratios.get(phase, {}).get(str(concurrency))
            ratios[phase][str(concurrency)] = (
                round(statistics.median(rounds), 2) if rounds else total
            )
    out["cpu_per_chunk_vs_bare"] = {
        "by_concurrency": ratios["throughput"],
        "paced_by_concurrency": ratios["paced"],
        "round_ratios": report.cpu_round_ratios,
        "of_all_rounds": of_totals,
        "target": "<= 1.5",
    }
    mints = {m.target: m for m in report.mint}
    if "bare" in mints and "healthagent" in mints:
        of_medians = round(
            mints["healthagent"].requests_per_second / mints["bare"].requests_per_second, 3
        )
        out["mint_rps_vs_bare"] = {
            # the median of the rounds' own ratios, each of two neighbouring runs
            "ratio": statistics.median(report.mint_round_ratios)
            if report.mint_round_ratios
            else of_medians,
            "round_ratios": report.mint_round_ratios,
            "ratio_of_medians": of_medians,
            "target": ">= 0.8",
        }
    for open_streams in report.open_streams:
        if open_streams.target in ("healthagent", WORKERS_TARGET):
            key = "open_streams" if open_streams.target == "healthagent" else "open_streams_workers"
            out[key] = {
                "streams": open_streams.streams,
                "workers": open_streams.workers,
                "errors": sum(open_streams.errors.values()),
                "server_rss_peak_mib": round(open_streams.server_rss_peak_bytes / 2**20, 1),
                "target": "no errors, <= 1536 MiB",
            }
    return out


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


def markdown(report: Report) -> str:
    """The report as Markdown tables."""
    lines = [
        "| streams | target | phase | chunks/s | first chunk p50 / p99 ms"
        " | every chunk p50 / p99 ms | server CPU us/chunk | RSS per open stream | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report.phases:
        rss = f"{p.rss_per_open_stream_bytes / 1024:.1f} KiB" if p.phase == "paced" else ""
        lines.append(
            f"| {p.concurrency} | {p.target} | {p.phase}"
            + (f" ({p.pace_ms:g} ms)" if p.phase == "paced" else "")
            + f" | {p.chunks_per_second:,.0f}"
            f" | {p.first_chunk_latency['p50_ms']} / {p.first_chunk_latency['p99_ms']}"
            f" | {p.chunk_latency['p50_ms']} / {p.chunk_latency['p99_ms']}"
            f" | {p.server_cpu_us_per_chunk} | {rss} | {sum(p.errors.values()) or 0} |"
        )
    for phase, by_concurrency in report.cpu_round_ratios.items():
        for concurrency, round_ratios in by_concurrency.items():
            listed = ", ".join(f"{r:.2f}x" for r in round_ratios)
            lines.append(
                f"\nHealthAgent's CPU per chunk over the bare server's, {phase}, {concurrency}"
                f" streams, round by round: {listed}."
            )
    lines += [
        "",
        "| MintSession | concurrency | requests/s (median round) | every round | server CPU"
        " us/request | errors |",
        "|---|---|---|---|---|---|",
    ]
    for m in report.mint:
        lines.append(
            f"| {m.target} | {m.concurrency} | {m.requests_per_second:,.0f}"
            f" | {', '.join(f'{r:,.0f}' for r in m.rounds_rps)}"
            f" | {m.server_cpu_us_per_request} | {sum(m.errors.values())} |"
        )
    if report.mint_round_ratios:
        ratios = ", ".join(f"{r:.0%}" for r in report.mint_round_ratios)
        lines.append(f"\nHealthAgent's rate over the bare one's, round by round: {ratios}.")
    if report.open_streams:
        lines += [
            "",
            "| open streams | target | processes | max open at once | completed | errors"
            " | chunks | chunk latency p50 / p99 ms | first event p50 / p99 / max ms"
            " | server RSS idle | server RSS peak | CPU us/chunk: server, emulator, client |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for o in report.open_streams:
        per_chunk = 1e6 / o.chunks if o.chunks else float("nan")
        first = o.first_event_latency  # empty in a report from before it was measured
        lines.append(
            f"| {o.streams:,} | {o.target} | {o.workers} | {o.max_open:,} | {o.completed:,}"
            f" | {sum(o.errors.values())} | {o.chunks:,}"
            f" | {o.chunk_latency['p50_ms']} / {o.chunk_latency['p99_ms']}"
            f" | {first.get('p50_ms')} / {first.get('p99_ms')} / {first.get('max_ms')}"
            f" | {o.server_rss_idle_bytes / 2**20:.1f} MiB"
            f" | {o.server_rss_peak_bytes / 2**20:.1f} MiB"
            f" | {o.server_cpu_seconds * per_chunk:.0f}, {o.emulator_cpu_seconds * per_chunk:.0f},"
            f" {o.client_cpu_seconds * per_chunk:.0f} |"
        )
    return "\n".join(lines)


def plot(report: Report, out: Path) -> list[Path]:
    """Throughput and added latency against concurrency, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figures: list[tuple[str, str, str, Callable[[PhaseResult], float]]] = [
        ("throughput.png", "throughput", "chunks per second", lambda p: p.chunks_per_second),
        (
            "latency.png",
            "paced",
            "first-chunk latency p50 / p99 (ms)",
            lambda p: float(p.first_chunk_latency["p50_ms"]),
        ),
    ]
    for name, phase, ylabel, value in figures:
        figure, axes = plt.subplots(figsize=(6, 4))
        for target in TARGETS:
            points = [p for p in report.phases if p.target == target and p.phase == phase]
            if not points:
                continue
            xs = [p.concurrency for p in points]
            (line,) = axes.plot(xs, [value(p) for p in points], marker="o", label=f"{target}")
            if phase == "paced":
                axes.plot(
                    xs,
                    [float(p.first_chunk_latency["p99_ms"]) for p in points],
                    marker="x",
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{target} p99",
                )
        axes.set_xscale("log")
        if phase == "paced":
            axes.set_yscale("log")  # p99 at 1,000 streams is two orders above the rest
        axes.set_xlabel("concurrent streams")
        axes.set_ylabel(ylabel)
        axes.set_title(f"{phase}: sender to client, loopback, 2 cores")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out / name
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def load_report(path: Path) -> Report:
    """A report written earlier (`results.json`), to draw its plots again."""
    data = json.loads(path.read_text())
    report = Report(data["machine"], data["command"], targets=data["targets"])
    report.phases = [PhaseResult(**phase) for phase in data["phases"]]
    report.mint = [MintResult(**mint) for mint in data["mint"]]
    report.mint_round_ratios = data.get("mint_round_ratios", [])
    report.cpu_round_ratios = data.get("cpu_round_ratios", {})
    report.open_streams = [OpenStreamsResult(**o) for o in data["open_streams"]]
    return report
