"""The performance harness and the instruction counts run end to end at a tiny size and report
every figure.

Timings are not asserted here (shared, noisy machines); `docs/benchmarks.md` has the figures.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from bench.agent_path import PATHS
from bench.gateway import KINDS as GATEWAY_KINDS
from bench.performance import start_targets
from bench.report import TARGETS
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc

FIGURES = (  # of bench.instructions
    "instructions_per_mint",
    "instructions_per_chunk_unpaced",
    "instructions_per_chunk_paced",
)


@pytest.mark.slow
def test_harness_reports_every_figure(tmp_path: Path) -> None:
    concurrencies = [1, 3]
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.performance",
            "--concurrency",
            ",".join(map(str, concurrencies)),
            "--chunks",
            "5",
            "--seconds",
            "0.5",
            "--paced-seconds",
            "0.5",
            "--rounds",
            "2",
            "--mint-concurrency",
            "2",
            "--mint-seconds",
            "0.3",
            "--mint-rounds",
            "2",
            "--open-streams",
            "20",
            "--open-seconds",
            "2",
            "--open-ramp-seconds",
            "0.5",
            "--workers",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["machine"]["cores"] >= 1 and report["command"].startswith("python -m bench")

    phases = {(p["target"], p["concurrency"], p["phase"]): p for p in report["phases"]}
    assert set(phases) == {
        (t, c, phase) for t in TARGETS for c in concurrencies for phase in ("throughput", "paced")
    }
    for key, phase in phases.items():
        assert phase["errors"] == {}, key
        assert phase["turns"] >= phase["concurrency"] and phase["chunks"] >= 5 * phase["turns"]
        assert phase["chunks_per_second"] > 0 and phase["server_cpu_us_per_chunk"] >= 0
        for figure in ("first_chunk_latency", "chunk_latency", "time_to_first_chunk"):
            values = phase[figure]
            assert values["n"] > 0 and not math.isnan(values["p50_ms"]), (key, figure)
            # a chunk cannot arrive before it was sent: the clocks are one clock
            assert 0 <= values["p50_ms"] <= values["p99_ms"] <= values["max_ms"], (key, figure)
        if phase["phase"] == "paced":
            assert phase["pace_ms"] >= 10 and "rss_per_open_stream_bytes" in phase
        # bare and healthagent side by side in rounds; the direct reader once
        rounds = 1 if phase["target"] == "direct" else 2
        assert phase["rounds"] == rounds == len(phase["rounds_server_cpu_us_per_chunk"]), key

    cpu = report["targets"]["cpu_per_chunk_vs_bare"]
    for phase_name, by_concurrency in (
        ("throughput", cpu["by_concurrency"]),
        ("paced", cpu["paced_by_concurrency"]),
    ):
        for concurrency, ratio in by_concurrency.items():
            # a tenth of a second's work can take no CPU tick: such a round has no ratio
            ratios = report["cpu_round_ratios"][phase_name][concurrency]
            assert len(ratios) <= 2 and all(r > 0 for r in ratios)
            if ratios:
                assert ratio == round(statistics.median(ratios), 2)
            else:
                assert ratio == cpu["of_all_rounds"][phase_name][concurrency]

    mints = {m["target"]: m for m in report["mint"]}
    assert set(mints) == {"bare", "healthagent"}
    assert all(m["requests"] > 0 and m["errors"] == {} for m in mints.values())
    assert all(m["rounds"] == 2 and len(m["rounds_rps"]) == 2 for m in mints.values())
    # one ratio per round, of the two runs side by side; the target reads their median
    round_ratios = report["mint_round_ratios"]
    assert len(round_ratios) == 2 and all(r > 0 for r in round_ratios)
    assert report["targets"]["mint_rps_vs_bare"]["ratio"] == statistics.median(round_ratios)

    opened = {o["target"]: o for o in report["open_streams"]}
    assert list(opened) == ["bare", "healthagent", "healthagent-workers"]
    for open_streams in opened.values():
        assert open_streams["completed"] == 20 and open_streams["errors"] == {}
        assert open_streams["chunks"] == 20 * 2 and open_streams["server_rss_peak_bytes"] > 0
        latency = open_streams["chunk_latency"]
        assert latency["n"] == 40 and 0 <= latency["p50_ms"] <= latency["max_ms"]
        first_event = open_streams["first_event_latency"]  # one per call
        assert first_event["n"] == 20 and 0 < first_event["p50_ms"] <= first_event["max_ms"]
        assert open_streams["client_cpu_seconds"] > 0
    assert [opened[t]["workers"] for t in opened] == [1, 1, 2]
    # the server CPU and memory of the workers are the supervisor's and both workers'
    assert (
        opened["healthagent-workers"]["server_rss_peak_bytes"]
        > (opened["healthagent"]["server_rss_idle_bytes"])
    )

    targets = report["targets"]
    assert set(targets) == {
        "cpu_per_chunk_vs_bare",
        "mint_rps_vs_bare",
        "open_streams",
        "open_streams_workers",
    }
    assert set(targets["cpu_per_chunk_vs_bare"]["by_concurrency"]) == {"1", "3"}
    assert set(targets["cpu_per_chunk_vs_bare"]["paced_by_concurrency"]) == {"1", "3"}
    for plot in ("throughput.png", "latency.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")
    assert "| streams | target | phase |" in finished.stdout

    for plot in ("throughput.png", "latency.png"):
        (tmp_path / plot).unlink()
    replotted = subprocess.run(
        [sys.executable, "-m", "bench.performance", "--replot", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replotted.returncode == 0, replotted.stderr[-4000:]
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_instruction_counts_report_every_figure(tmp_path: Path) -> None:
    """`bench.instructions` at a tiny size: both servers counted under callgrind (on every
    machine kind), every figure a positive count, the ratios of the two."""
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.instructions",
            "--mint-calls",
            "16",
            "--turns",
            "1",
            "--callers",
            "2",
            "--paced-callers",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads((tmp_path / "instructions.json").read_text())
    counts = {c["target"]: c for c in report["counts"]}
    assert list(counts) == ["bare", "healthagent"]
    for target in counts.values():
        assert target["mint_calls"] == 16
        # every turn ended OK with its 100 chunks
        assert target["unpaced_chunks"] == 2 * 100 and target["paced_chunks"] == 100
        for figure in FIGURES:
            # more than a Python call costs, far less than a second of CPU
            assert 10_000 < target[figure] < 100_000_000, (target["target"], figure)
    assert set(report["ratios"]) == set(FIGURES)
    for figure in FIGURES:
        expected = counts["healthagent"][figure] / counts["bare"][figure]
        assert report["ratios"][figure] == round(expected, 3)
    assert "| healthagent / bare |" in finished.stdout


@pytest.mark.slow
async def test_the_ceiling_streams_the_same_messages_as_healthagent() -> None:
    """The bare server must send what HealthAgent sends for the same turn (the same number and
    size of messages), or the CPU ratio compares unlike work."""
    targets = start_targets()
    try:
        seen: dict[str, list[tuple[str, int]]] = {}
        for name, address in (
            ("bare", targets.bare_address),
            ("healthagent", targets.healthagent.address),
        ):
            async with grpc.aio.insecure_channel(address) as channel:
                call = pb_grpc.HealthAgentStub(channel).Chat(
                    pb.ChatRequest(message="[chunks=3] [pace=10] [stamp]", user="same-1"),
                    timeout=30,
                )
                seen[name] = [(str(e.WhichOneof("event")), e.ByteSize()) async for e in call]
    finally:
        targets.stop()
    # session, two passthroughs, progress, the chunks, text done, response done
    assert len(seen["healthagent"]) == 3 + 6
    assert seen["bare"] == seen["healthagent"]


@pytest.mark.slow
def test_agent_path_reports_every_figure(tmp_path: Path) -> None:
    """`bench.agent_path` at a tiny size: both paths (serve on the emulator's ChatKit; serve on
    the agent server on the emulator's Responses API), every turn OK, every figure present."""
    streams, chunks = 3, 5
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.agent_path",
            "--streams",
            str(streams),
            "--chunks",
            str(chunks),
            "--pace-ms",
            "20",
            "--seconds",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads((tmp_path / "agent-path.json").read_text())
    assert report["command"].startswith("python -m bench.agent_path")
    assert (report["streams"], report["chunks_per_turn"], report["pace_ms"]) == (streams, 5, 20)
    paths = {r["path"]: r for r in report["paths"]}
    assert list(paths) == list(PATHS)
    for name, result in paths.items():
        paced = result["paced"]
        assert paced["errors"] == {} and result["warm_errors"] == {}, (name, result)
        assert paced["turns"] >= streams and paced["chunks"] == chunks * paced["turns"]
        for figure in ("first_chunk_latency", "chunk_latency", "time_to_first_chunk"):
            values = paced[figure]
            assert values["n"] > 0 and not math.isnan(values["p50_ms"]), (name, figure)
            # a chunk cannot arrive before the model sent it: one clock on the machine
            assert 0 <= values["p50_ms"] <= values["p99_ms"] <= values["max_ms"], (name, figure)
        assert paced["server_cpu_us_per_chunk"] >= 0 and result["path_cpu_us_per_chunk"] > 0
        assert result["rss_peak_mib"]["serve"] >= result["rss_idle_mib"]["serve"] > 0
        assert 0 <= result["neighbours_busy_cores"] <= result["machine_busy_cores"]
        assert report["targets"][name]["errors"] == 0
    # the agent server is a process of its own, accounted for apart from serve
    assert "agent" not in paths["emulator"]["rss_idle_mib"]
    assert paths["emulator"]["agent_cpu_us_per_chunk"] == 0
    assert paths["agent"]["rss_peak_mib"]["agent"] >= paths["agent"]["rss_idle_mib"]["agent"] > 0
    assert paths["agent"]["agent_cpu_us_per_chunk"] > 0
    assert "| path | turns | chunks |" in finished.stdout


@pytest.mark.slow
def test_gateway_reports_every_figure(tmp_path: Path) -> None:
    """`bench.gateway` at a tiny size: direct gRPC, gRPC-Web and the seeds' SSE through one
    `serve --http`, in rotated rounds, every turn OK, every figure present."""
    streams, chunks, rounds = 3, 5, 2
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gateway",
            "--streams",
            str(streams),
            "--chunks",
            str(chunks),
            "--pace-ms",
            "20",
            "--seconds",
            "1",
            "--rounds",
            str(rounds),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads((tmp_path / "gateway.json").read_text())
    assert report["command"].startswith("python -m bench.gateway")
    assert (report["streams"], report["chunks_per_turn"], report["rounds"]) == (3, 5, 2)
    # rotated: each round starts with the next kind
    assert report["order"] == [list(GATEWAY_KINDS), [*GATEWAY_KINDS[1:], GATEWAY_KINDS[0]]]
    kinds = {r["kind"]: r for r in report["kinds"]}
    assert list(kinds) == list(GATEWAY_KINDS)
    for name, result in kinds.items():
        paced = result["paced"]
        assert paced["errors"] == {} and result["warm_errors"] == {}, (name, result)
        assert paced["turns"] >= streams and paced["chunks"] == chunks * paced["turns"]
        assert paced["rounds"] == rounds == len(result["rounds_chunk_latency"])
        for figure in ("first_chunk_latency", "chunk_latency", "time_to_first_chunk"):
            values = paced[figure]
            assert values["n"] > 0 and not math.isnan(values["p50_ms"]), (name, figure)
            # a chunk cannot arrive before the emulator sent it: one clock on the machine
            assert 0 <= values["p50_ms"] <= values["p99_ms"] <= values["max_ms"], (name, figure)
        assert paced["server_cpu_us_per_chunk"] > 0 and paced["client_cpu_us_per_chunk"] > 0
        assert 0 <= result["load_cores"]["neighbours_busy"] <= result["load_cores"]["machine_busy"]
        # serve's CPU a chunk over the direct path's, one ratio a round (a round may have
        # taken no CPU tick at this size), and the target reads their median
        ratios = result["rounds_cpu_ratio"]
        assert len(ratios) <= rounds and all(r > 0 for r in ratios)
        if ratios:
            assert result["cpu_ratio"] == round(statistics.median(ratios), 2)
        added = result["added_chunk_latency_ms"]
        expected = (
            paced["chunk_latency"]["p50_ms"] - kinds["grpc"]["paced"]["chunk_latency"]["p50_ms"]
        )
        assert added["p50_ms"] == round(expected, 3)
    assert kinds["grpc"]["added_chunk_latency_ms"]["p50_ms"] == 0
    targets = report["targets"]
    assert set(targets) == {"target", "grpc-web", "sse"}
    for name in ("grpc-web", "sse"):
        assert targets[name]["errors"] == 0 and set(targets[name]["met"]) == {
            "added_p50",
            "added_p99",
            "cpu_ratio",
            "errors",
        }
    assert "| kind | turns | chunks |" in finished.stdout
