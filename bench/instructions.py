"""Instruction counts: what the HealthAgent hop costs, counted rather than timed.

    python -m bench.instructions --out docs/benchmarks

Runs the bare server (`bench/bare_server.py`) and `healthagent serve` in front of the emulator,
each under valgrind's callgrind with counting off until its load is warm, and counts the
instructions each executes (all threads) per MintSession with a warm pool, per chunk of unpaced
100-chunk turns, and per chunk of turns paced 20 ms a chunk. Every window is counted between
`callgrind_control -i on` and a dump.

A count is the same for the same code and inputs however busy the machine is, so it tells a
change from the noise that moves the timed figures of `bench.performance` by a third from one
minute to the next. It is not a replacement for them: valgrind sees user-space instructions
only, not the kernel's work (system calls, loopback TCP) nor what cache misses cost, so the
timed CPU ratios run above these. Paced counts also depend a little on timing (how many wake-ups
a chunk takes), a percent or two from run to run. Loopback only, every call with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cli import add_seed_and_out, progress, write_report
from bench.clients import GrpcTurns
from bench.performance import WORKFLOW, load_test_env
from harness.processes import (
    HEALTHAGENT,
    clean_env,
    free_port,
    start_emulator_process,
    wait_serving,
)

CALLGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
TARGETS = ("bare", "healthagent")
UNPACED = "[chunks=100] [stamp]"
PACED = "[chunks=100] [pace=20] [stamp]"
START_SECONDS = 240.0  # a Python server starts about 50 times slower under valgrind
DUMP_SECONDS = 60.0


@dataclass
class InstructionCounts:
    """One target's counts."""

    target: str
    mint_calls: int = 0
    instructions_per_mint: int = 0
    unpaced_chunks: int = 0
    instructions_per_chunk_unpaced: int = 0
    paced_chunks: int = 0
    instructions_per_chunk_paced: int = 0


@dataclass
class InstructionReport:
    command: str
    counts: list[InstructionCounts] = field(default_factory=list)
    # HealthAgent's count over the bare server's, per figure
    ratios: dict[str, float] = field(default_factory=dict)


class CountedServer:
    """A server process under callgrind, and its dumps."""

    def __init__(
        self, command: list[str], env: dict[str, str] | None, out_dir: Path, *, stdout: int
    ) -> None:
        self._out_dir = out_dir
        self.process = subprocess.Popen(
            [*CALLGRIND, f"--callgrind-out-file={out_dir}/callgrind.%p.out", *command],
            env=env,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
        self._dumps = 0

    def _control(self, *arguments: str) -> None:
        subprocess.run(
            ["callgrind_control", *arguments, str(self.process.pid)],
            capture_output=True,
            check=True,
            timeout=DUMP_SECONDS,
        )

    def start_counting(self) -> None:
        self._control("-i", "on")

    def stop_counting(self) -> int:
        """Stop counting and dump; the instructions counted since the last dump."""
        self._control("-i", "off")
        self._control("-d")
        self._dumps += 1
        dump = self._out_dir / f"callgrind.{self.process.pid}.out.{self._dumps}"
        deadline = time.monotonic() + DUMP_SECONDS
        while True:
            if dump.exists():
                for line in reversed(dump.read_text().splitlines()):
                    if line.startswith("totals:"):
                        return int(line.split()[1])
            if time.monotonic() > deadline:
                raise TimeoutError(f"callgrind wrote no totals to {dump}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(DUMP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(DUMP_SECONDS)


async def _mints(address: str, calls: int, callers: int) -> int:
    client = GrpcTurns(address, callers)
    try:
        await client.prepare([])

        async def caller(index: int) -> None:
            for _ in range(calls // callers):
                await client.mint(index, f"count-{index}")

        await asyncio.gather(*(caller(i) for i in range(callers)))
    finally:
        await client.close()
    return calls // callers * callers


async def _turns(address: str, message: str, turns: int, callers: int) -> int:
    """`turns` turns from each of `callers`; the chunks they got (every turn must end OK)."""
    client = GrpcTurns(address, callers)
    chunks = 0
    try:
        await client.prepare([])

        async def caller(index: int) -> None:
            nonlocal chunks
            for _ in range(turns):
                sample = await client.turn(index, f"count-{index}", message)
                if sample.error is not None:
                    raise RuntimeError(f"turn failed: {sample.error} {sample.detail}")
                chunks += sample.chunks

        await asyncio.gather(*(caller(i) for i in range(callers)))
    finally:
        await client.close()
    return chunks


def count(server: CountedServer, address: str, options: argparse.Namespace) -> InstructionCounts:
    """Warm each load with counting off, then count it."""
    result = InstructionCounts("")
    asyncio.run(_mints(address, options.mint_calls // 2, options.callers))
    server.start_counting()
    result.mint_calls = asyncio.run(_mints(address, options.mint_calls, options.callers))
    result.instructions_per_mint = server.stop_counting() // result.mint_calls
    for message, callers, chunks_field, per_chunk_field in (
        (UNPACED, options.callers, "unpaced_chunks", "instructions_per_chunk_unpaced"),
        (PACED, options.paced_callers, "paced_chunks", "instructions_per_chunk_paced"),
    ):
        asyncio.run(_turns(address, message, 1, callers))
        server.start_counting()
        chunks = asyncio.run(_turns(address, message, options.turns, callers))
        setattr(result, chunks_field, chunks)
        setattr(result, per_chunk_field, server.stop_counting() // chunks)
    return result


def wait_until_listening(server: CountedServer, target: str, address: str) -> None:
    if target == "bare":  # prints its address once it listens
        assert server.process.stdout is not None
        if not server.process.stdout.readline():
            raise RuntimeError("the bare server exited under valgrind")
    else:
        wait_serving(address, timeout=START_SECONDS)


def run(options: argparse.Namespace) -> InstructionReport:
    report = InstructionReport(" ".join(["python -m bench.instructions", *sys.argv[1:]]))
    emulator = start_emulator_process(chunk_delay_ms="0", workflow=WORKFLOW)
    try:
        with tempfile.TemporaryDirectory(prefix="callgrind-") as out:
            for target in TARGETS:
                address = f"127.0.0.1:{free_port()}"
                if target == "bare":
                    command = [sys.executable, "-m", "bench.bare_server", "--listen", address]
                    server = CountedServer(command, None, Path(out), stdout=subprocess.PIPE)
                else:
                    command = [HEALTHAGENT, "serve", "--listen", address]
                    env = clean_env(**load_test_env(emulator))
                    server = CountedServer(command, env, Path(out), stdout=subprocess.DEVNULL)
                try:
                    wait_until_listening(server, target, address)
                    counts = count(server, address, options)
                finally:
                    server.stop()
                counts.target = target
                report.counts.append(counts)
                progress(counts)
    finally:
        emulator.stop()
    bare, ours = report.counts
    for figure in (
        "instructions_per_mint",
        "instructions_per_chunk_unpaced",
        "instructions_per_chunk_paced",
    ):
        report.ratios[figure] = round(getattr(ours, figure) / getattr(bare, figure), 3)
    return report


def markdown(report: InstructionReport) -> str:
    lines = [
        "| target | instructions per MintSession | per chunk, unpaced | per chunk, paced 20 ms |",
        "|---|---|---|---|",
    ]
    for c in report.counts:
        lines.append(
            f"| {c.target} | {c.instructions_per_mint:,} | {c.instructions_per_chunk_unpaced:,}"
            f" | {c.instructions_per_chunk_paced:,} |"
        )
    ratios = report.ratios
    lines.append(
        f"| healthagent / bare | {ratios['instructions_per_mint']:.2f}x"
        f" | {ratios['instructions_per_chunk_unpaced']:.2f}x"
        f" | {ratios['instructions_per_chunk_paced']:.2f}x |"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mint-calls", type=int, default=800, help="counted MintSessions")
    parser.add_argument("--turns", type=int, default=2, help="counted turns per caller")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--paced-callers", type=int, default=4)
    add_seed_and_out(parser, seed=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> InstructionReport:
    options = parse_args(argv)
    report = run(options)
    write_report(report, options.out / "instructions.json", markdown(report))
    return report


if __name__ == "__main__":
    main()
