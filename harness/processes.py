"""Run `healthagent serve`, `healthagent agent` and `healthagent emulator` as real processes
(tests and benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTHAGENT = str(Path(sys.executable).parent / "healthagent")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without any HealthAgent or OpenAI setting, plus `extra`;
    history goes to a fresh temporary directory unless `extra` says where."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HEALTHAGENT_"))}
    env["HEALTHAGENT_DATA_DIR"] = tempfile.mkdtemp(prefix="healthagent-test-")
    env.update(extra)
    return env


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    address: str
    log_file: IO[bytes]
    seconds_to_serving: float

    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode()

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def wait_serving(address: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = stub.Check(
                    health_pb2.HealthCheckRequest(service="healthagent.v1.HealthAgent"), timeout=1
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become SERVING")
            time.sleep(0.05)


def _launch(
    arguments: list[str], env: dict[str, str], wait_ready: Callable[[subprocess.Popen[bytes]], None]
) -> tuple[subprocess.Popen[bytes], IO[bytes], float]:
    """Start `healthagent ARGUMENTS` with its output in a temporary file, and wait until
    `wait_ready` returns: the process, its log and the seconds that took. A TimeoutError from
    `wait_ready` kills it and raises its log."""
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
    started = time.monotonic()
    process = subprocess.Popen(
        [HEALTHAGENT, *arguments], stdout=log_file, stderr=subprocess.STDOUT, env=clean_env(**env)
    )
    try:
        wait_ready(process)
    except TimeoutError:
        process.kill()
        log_file.seek(0)
        raise RuntimeError(log_file.read().decode()) from None
    return process, log_file, time.monotonic() - started


def start_serve(listen: str | None = None, **env: str) -> ServeProcess:
    """Start `healthagent serve` on `listen` (default: a free loopback port) and wait until it
    is SERVING."""
    address = listen or f"127.0.0.1:{free_port()}"
    process, log_file, seconds = _launch(
        ["serve", "--listen", address], env, lambda _: wait_serving(address)
    )
    return ServeProcess(process, address, log_file, seconds)


@dataclass
class AgentServerProcess(ServeProcess):
    """`healthagent agent`, its own process: `address` is its ChatKit URL, `auth_header` the
    credential it requires of the service."""

    auth_header: str = ""

    def service_env(self) -> dict[str, str]:
        """Settings that point `serve` at this agent server (agent mode, no child of its own)."""
        return {
            "HEALTHAGENT_UPSTREAM": "agent",
            "HEALTHAGENT_CHATKIT_URL": self.address,
            "HEALTHAGENT_CHATKIT_AUTH_HEADER": self.auth_header,
        }


def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until `url` answers 200 (TimeoutError if it does not, or the process ends first)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code == 200:
                    return
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200")


def start_agent_server(**env: str) -> AgentServerProcess:
    """Start `healthagent agent` on a free loopback port, with a service credential made for it,
    and wait until its health check answers (its imports take seconds)."""
    port = free_port()
    auth_header = f"Authorization: Bearer {secrets.token_urlsafe(32)}"
    process, log_file, seconds = _launch(
        ["agent", "--listen", f"127.0.0.1:{port}"],
        {"HEALTHAGENT_CHATKIT_AUTH_HEADER": auth_header, **env},
        lambda started: wait_http_ok(f"http://127.0.0.1:{port}/healthz", started),
    )
    url = f"http://127.0.0.1:{port}/chatkit"
    return AgentServerProcess(process, url, log_file, seconds, auth_header)


LISTEN, TIME_WAIT = "0A", "06"  # TCP states as /proc/net/tcp writes them


def port_sockets(port: int, state: str = LISTEN) -> list[str]:
    """The inodes of this network namespace's TCP sockets on local `port` in `state`, IPv4
    and IPv6 (gRPC listens on 127.0.0.1 through an IPv6 socket, as ::ffff:127.0.0.1); a socket
    in TIME_WAIT has inode 0."""
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(fields[9])
    return inodes


def listening_workers(server: ServeProcess) -> int:
    """How many workers of `serve --workers N` listen on its port now."""
    inodes = set(port_sockets(int(server.address.rsplit(":", 1)[1])))
    count = 0
    for pid in child_pids(server.process.pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            sockets = {
                os.readlink(fd).removeprefix("socket:[").rstrip("]")
                for fd in Path(f"/proc/{pid}/fd").iterdir()
            }
            count += bool(sockets & inodes)
    return count


def wait_for_workers(server: ServeProcess, count: int, timeout: float = 30.0) -> None:
    """Wait until `count` workers of `serve --workers N` listen (the port answers as soon as
    the first one does, whatever the log level)."""
    deadline = time.monotonic() + timeout
    while listening_workers(server) < count:
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise TimeoutError(f"{count} workers did not come up:\n{server.log()[-4000:]}")
        time.sleep(0.05)


@dataclass
class EmulatorProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    realtime_url: str
    api_key: str

    def service_env(self, workflow: str = "wf_test") -> dict[str, str]:
        """Settings that point a service at this emulator as if it were OpenAI."""
        return {
            "HEALTHAGENT_UPSTREAM": "chatkit",
            "OPENAI_BASE_URL": self.base_url,
            "OPENAI_REALTIME_URL": self.realtime_url,
            "OPENAI_API_KEY": self.api_key,
            "OPENAI_WORKFLOW_ID": workflow,
        }

    def agent_env(self) -> dict[str, str]:
        """Settings that make the agent server's model this emulator's Responses API."""
        return {"OPENAI_API_KEY": self.api_key, "HEALTHAGENT_AGENT_BASE_URL": self.base_url}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_emulator_process(
    chunk_delay_ms: str = "5", api_key: str = "sk-shared-emulator", workflow: str = "wf_test"
) -> EmulatorProcess:
    """`healthagent emulator` on free loopback ports, shared by several service processes."""
    process = subprocess.Popen(
        [
            HEALTHAGENT,
            "emulator",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--realtime-listen",
            f"127.0.0.1:{free_port()}",
            "--api-key",
            api_key,
            "--workflow",
            workflow,
        ],
        stdout=subprocess.PIPE,
        env=clean_env(HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS=chunk_delay_ms),
    )
    assert process.stdout is not None
    banner = json.loads(process.stdout.readline())
    return EmulatorProcess(
        process, banner["OPENAI_BASE_URL"], banner["OPENAI_REALTIME_URL"], api_key
    )


def _status_bytes(pid: int) -> dict[str, int]:
    """The size fields of /proc/PID/status ("VmRSS", "RssAnon", ...), in bytes."""
    sizes: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            sizes[name] = int(value.split()[0]) * 1024
    return sizes


def rss_breakdown(pid: int) -> dict[str, int]:
    """Resident memory split into anonymous (heap), file-backed and shared pages, in bytes."""
    sizes = _status_bytes(pid)
    return {"anon": sizes["RssAnon"], "file": sizes["RssFile"], "shmem": sizes["RssShmem"]}


def open_files(pid: int) -> int:
    """How many file descriptors (sockets included) a process holds (Linux /proc)."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid`, such as the workers of `serve --workers N` (Linux
    /proc)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    return _status_bytes(pid)["VmRSS"]


def tree_pids(pid: int) -> list[int]:
    """`pid` and its live children (the workers of `serve --workers N`)."""
    return [pid, *child_pids(pid)]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its live children (one that ends meanwhile counts 0)."""
    return sum(tree_rss_breakdown(pid).values())


def tree_rss_breakdown(pid: int) -> dict[str, int]:
    """`rss_breakdown` summed over a process and its live children."""
    total: dict[str, int] = {}
    for member in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError, KeyError):  # gone, or a zombie by now
            for kind, size in rss_breakdown(member).items():
                total[kind] = total.get(kind, 0) + size
    return total


def tree_open_files(pid: int) -> int:
    """`open_files` summed over a process and its live children."""
    total = 0
    for member in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError):
            total += open_files(member)
    return total
