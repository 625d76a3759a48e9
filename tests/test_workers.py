"""`healthagent serve --workers N`: real processes sharing one port through SO_REUSEPORT,
one SQLite history, and revocations; a worker that dies is replaced; SIGTERM stops them all."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from harness.processes import (
    HEALTHAGENT,
    EmulatorProcess,
    ServeProcess,
    child_pids,
    clean_env,
    free_port,
    start_emulator_process,
    start_serve,
    wait_for_workers,
)
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.config import Settings
from healthagent_service.workers import worker_problems

NO_LIMITS = {"HEALTHAGENT_RATE_LIMIT_PER_MINUTE": "0", "HEALTHAGENT_MAX_STREAMS_PER_USER": "0"}


def children(pid: int) -> set[int]:
    return set(child_pids(pid))


def worker_id(stub: pb_grpc.HealthAgentStub) -> str:
    """Which worker answered: new request ids start with a random prefix per process."""
    _, call = stub.MintSession.with_call(pb.MintSessionRequest(user="probe"), timeout=10)
    request_id = dict(call.trailing_metadata() or ())["x-request-id"]
    return str(request_id)[:16]


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    process = start_emulator_process(chunk_delay_ms="1")
    yield process
    process.stop()


@pytest.fixture
def workers(emulator: EmulatorProcess) -> Iterator[ServeProcess]:
    server = start_serve(**emulator.service_env(), **NO_LIMITS, HEALTHAGENT_WORKERS="2")
    wait_for_workers(server, 2)
    yield server
    if server.process.poll() is None:
        assert server.terminate() == 0
    assert "Traceback" not in server.log()


@pytest.fixture
def stub_per_worker(workers: ServeProcess) -> Iterator[dict[str, pb_grpc.HealthAgentStub]]:
    """A channel to each worker: new connections until both have answered (the kernel picks a
    worker per connection; 40 connections all to one of two has odds of 2 in 10^12)."""
    channels: list[grpc.Channel] = []
    stubs: dict[str, pb_grpc.HealthAgentStub] = {}
    try:
        for index in range(40):
            # a distinct argument per channel, or gRPC would share one connection among them
            channel = grpc.insecure_channel(workers.address, options=[("test.channel", index)])
            channels.append(channel)
            stub = pb_grpc.HealthAgentStub(channel)
            stubs.setdefault(worker_id(stub), stub)
            if len(stubs) == 2:
                break
        assert len(stubs) == 2, "every connection reached the same worker"
        yield stubs
    finally:
        for channel in channels:
            channel.close()


def test_two_workers_share_one_port_and_one_history(
    workers: ServeProcess, stub_per_worker: dict[str, pb_grpc.HealthAgentStub]
) -> None:
    assert len(children(workers.process.pid)) == 2
    first, second = stub_per_worker.values()
    events = list(first.Chat(pb.ChatRequest(message="[chunks=3] hello", user="wanda"), timeout=30))
    conversation_id = events[0].session.conversation_id
    more = list(
        second.Chat(
            pb.ChatRequest(message="and again", user="wanda", conversation_id=conversation_id),
            timeout=30,
        )
    )
    assert more[-1].WhichOneof("event") == "response_done"
    for stub in (first, second):  # both read the one SQLite file, the other's turn included
        seen = stub.GetConversation(
            pb.GetConversationRequest(user="wanda", conversation_id=conversation_id)
        ).conversation
        assert [m.text for m in seen.messages][::2] == ["[chunks=3] hello", "and again"]
        assert all(m.status == pb.MESSAGE_STATUS_COMPLETE for m in seen.messages)


def test_a_revocation_on_one_worker_empties_the_other_workers_pool(
    stub_per_worker: dict[str, pb_grpc.HealthAgentStub],
) -> None:
    holder, revoker = stub_per_worker.values()
    before = holder.MintSession(pb.MintSessionRequest(user="vera"))
    # pooled: the same session again, until it is revoked
    assert holder.MintSession(pb.MintSessionRequest(user="vera")).session.id == before.session.id
    assert revoker.RevokeSessions(pb.RevokeSessionsRequest(user="vera")).revoked_sessions >= 1
    revoked_at = time.monotonic()
    while True:
        after = holder.MintSession(pb.MintSessionRequest(user="vera"))
        if after.session.id != before.session.id or time.monotonic() - revoked_at > 5:
            break
        time.sleep(0.02)
    assert after.session.id != before.session.id
    print(f"the other worker stopped handing it out {time.monotonic() - revoked_at:.2f} s later")


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced(
    workers: ServeProcess, stub_per_worker: dict[str, pb_grpc.HealthAgentStub]
) -> None:
    supervisor = workers.process.pid
    victim = min(children(supervisor))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while victim in children(supervisor) and time.monotonic() < deadline:
        time.sleep(0.05)
    wait_for_workers(workers, 2)  # the survivor and the replacement
    assert victim not in children(supervisor) and len(children(supervisor)) == 2
    # the replacement answers new connections: a third worker id (a new process) appears
    seen = set(stub_per_worker)
    for index in range(40):
        with grpc.insecure_channel(workers.address, options=[("test.after", index)]) as channel:
            seen.add(worker_id(pb_grpc.HealthAgentStub(channel)))
        if len(seen) == 3:
            break
    assert len(seen) == 3, "no connection reached the replacement"
    assert "worker exited; restarting" in workers.log()


def _two_free_ports() -> int:
    """A port P such that P and P + 1 are both free now."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def test_each_worker_serves_its_metrics_on_its_own_port(emulator: EmulatorProcess) -> None:
    base = _two_free_ports()
    server = start_serve(
        **emulator.service_env(),
        **NO_LIMITS,
        HEALTHAGENT_WORKERS="2",
        HEALTHAGENT_METRICS_LISTEN=f"127.0.0.1:{base}",
    )
    try:
        deadline = time.monotonic() + 20
        pages: dict[int, str] = {}
        while len(pages) < 2 and time.monotonic() < deadline:
            for port in (base, base + 1):
                with contextlib.suppress(httpx.HTTPError):
                    pages[port] = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            time.sleep(0.1)
        assert sorted(pages) == [base, base + 1]
        assert all("healthagent_active_streams" in page for page in pages.values())
    finally:
        assert server.terminate() == 0


def test_sigterm_stops_the_workers_and_the_supervisor(workers: ServeProcess) -> None:
    pids = children(workers.process.pid)
    assert workers.terminate() == 0
    assert not any(_running(pid) for pid in pids)
    assert workers.log().count('"stopped"') >= 3  # each worker, then the supervisor


def test_workers_stop_when_the_supervisor_is_killed(workers: ServeProcess) -> None:
    pids = children(workers.process.pid)
    workers.process.kill()  # SIGKILL: no chance to pass anything on
    workers.process.wait(10)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)
        assert not any(_running(pid) for pid in pids), "orphaned workers"
    finally:
        for pid in pids:  # leave nothing behind when it fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a PID 1 that may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status.split("State:")[1].split("\n")[0].lower()


def _serve_exit(env: dict[str, str], listen: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HEALTHAGENT, "serve", "--listen", listen],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workers_refuse_what_they_cannot_share(emulator: EmulatorProcess) -> None:
    listen = f"127.0.0.1:{free_port()}"
    embedded = _serve_exit({"HEALTHAGENT_WORKERS": "2", **NO_LIMITS}, listen)
    assert embedded.returncode == 2
    assert "embedded emulator" in embedded.stdout + embedded.stderr
    in_memory = _serve_exit({**emulator.service_env(), "HEALTHAGENT_WORKERS": "2"}, listen)
    assert in_memory.returncode == 2
    assert "HEALTHAGENT_REDIS_URL" in in_memory.stdout + in_memory.stderr


def test_workers_refuse_metrics_ports_their_agent_children_would_share(
    emulator: EmulatorProcess,
) -> None:
    """Worker *i* serves /metrics on PORT + i and so does its agent child on the agent's
    port: with 9464 and 9465 and two workers, worker 1 and worker 0's child would both want
    9465, and one of them could never start."""
    agent = {
        **NO_LIMITS,
        **emulator.agent_env(),
        "HEALTHAGENT_UPSTREAM": "agent",
        "HEALTHAGENT_WORKERS": "2",
    }
    port = free_port()
    clashing = _serve_exit(
        {
            **agent,
            "HEALTHAGENT_METRICS_LISTEN": f"127.0.0.1:{port}",
            "HEALTHAGENT_AGENT_METRICS_LISTEN": f"0.0.0.0:{port + 1}",
        },
        f"127.0.0.1:{free_port()}",
    )
    output = clashing.stdout + clashing.stderr
    assert clashing.returncode == 2, output[-2000:]
    assert f"({port + 1}-{port + 2})" in output and "do not overlap" in output

    settings = Settings.from_environment(
        **agent,
        HEALTHAGENT_METRICS_LISTEN=f"127.0.0.1:{port}",
        HEALTHAGENT_AGENT_METRICS_LISTEN=f"127.0.0.1:{port + 2}",
    )
    assert worker_problems(settings) == []  # 9464-9465 and 9466-9467 do not meet


def test_a_second_group_of_workers_cannot_share_the_port(
    emulator: EmulatorProcess, workers: ServeProcess
) -> None:
    env = {**emulator.service_env(), **NO_LIMITS, "HEALTHAGENT_WORKERS": "2"}
    second = _serve_exit(env, workers.address)
    assert second.returncode == 2
    assert "Address already in use" in second.stdout + second.stderr


@pytest.mark.slow
def test_workers_that_keep_dying_stop_the_supervisor(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    """A corrupt history file kills every worker at start (status 1, not "cannot start"):
    after five quick deaths in a row the supervisor gives up with 1, so that systemd or
    Kubernetes see it, instead of holding a port that nobody serves."""
    (tmp_path / "healthagent.db").write_bytes(b"this is not a database" * 100)
    env = {
        **emulator.service_env(),
        **NO_LIMITS,
        "HEALTHAGENT_WORKERS": "2",
        "HEALTHAGENT_DATA_DIR": str(tmp_path),
    }
    result = _serve_exit(env, f"127.0.0.1:{free_port()}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "a worker keeps failing" in output and output.count("worker exited; restarting") >= 4


def test_workers_refuse_a_port_another_program_holds(emulator: EmulatorProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**emulator.service_env(), **NO_LIMITS, "HEALTHAGENT_WORKERS": "2"}
        result = _serve_exit(env, f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert "Address already in use" in result.stdout + result.stderr


def test_workers_share_the_http_listeners_port(emulator: EmulatorProcess) -> None:
    web_port = free_port()
    server = start_serve(
        **emulator.service_env(),
        **NO_LIMITS,
        HEALTHAGENT_WORKERS="2",
        HEALTHAGENT_HTTP_LISTEN=f"127.0.0.1:{web_port}",
    )
    try:
        wait_for_workers(server, 2)
        answered_by: set[str] = set()
        request = pb.MintSessionRequest(user="web-worker").SerializeToString()
        body = len(request).to_bytes(5, "big") + request
        for _ in range(40):  # a new connection each time: the kernel picks a worker for each
            with httpx.Client(timeout=10) as http:
                reply = http.post(
                    f"http://127.0.0.1:{web_port}/healthagent.v1.HealthAgent/MintSession",
                    content=body,
                    headers={"content-type": "application/grpc-web+proto"},
                )
            trailers = _trailers_frame(reply.content)
            assert trailers["grpc-status"] == "0", trailers
            request_id = trailers["x-request-id"]
            answered_by.add(request_id[:16])
            if len(answered_by) == 2:
                break
        assert len(answered_by) == 2, "every HTTP connection reached the same worker"
    finally:
        assert server.terminate() == 0
    assert "Traceback" not in server.log()


def _trailers_frame(body: bytes) -> dict[str, str]:
    """The trailers frame (flag 0x80) of a gRPC-Web answer, as a dict."""
    offset = 0
    while offset < len(body):
        flags, length = body[offset], int.from_bytes(body[offset + 1 : offset + 5], "big")
        data = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flags & 0x80:
            pairs = [line.split(": ", 1) for line in data.decode().split("\r\n") if line]
            return {name: value for name, value in pairs}
    raise AssertionError("no trailers frame")
