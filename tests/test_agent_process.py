"""`serve` in agent mode as real processes: the agent server as a supervised child, restarted
when it dies and stopped with `serve`; agent mode without the extra; the default upstream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from harness.processes import HEALTHAGENT, clean_env, free_port, start_serve, wait_serving
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.agent_process import AGENT_EXTRA_INSTALL
from healthagent_service.config import UpstreamKind
from tests.support.service import make_settings


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as children:
        return [int(child) for child in children.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _answer(address: str, text: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.HealthAgentStub(channel)
        events = list(stub.Chat(pb.ChatRequest(message=text, user="proc-user"), timeout=30))
    return str(events[-1].response_done.text)


@pytest.mark.slow
def test_serve_runs_restarts_and_stops_its_agent_server() -> None:
    server = start_serve(
        HEALTHAGENT_UPSTREAM="agent",
        HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="1",
        HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS="0",
    )
    try:
        assert _answer(server.address, "hello agent").startswith("You said: hello agent.")
        (agent_pid,) = _children(server.process.pid)
        os.kill(agent_pid, signal.SIGKILL)
        # the next answer comes from a new agent server on the same port
        for _ in range(100):  # up to 20 s
            time.sleep(0.2)
            children = [pid for pid in _children(server.process.pid) if _alive(pid)]
            if children and children != [agent_pid]:
                try:
                    answer = _answer(server.address, "still there?")
                    break
                except grpc.RpcError:
                    continue
        else:
            raise AssertionError(f"the agent server was not restarted:\n{server.log()}")
        assert answer.startswith("You said: still there?")
        assert "agent server died; restarting" in server.log()
        (new_pid,) = children
    finally:
        status = server.terminate()
    assert status == 0, server.log()
    assert not _alive(new_pid)
    assert "Traceback" not in server.log()


def test_the_first_quick_start_needs_no_agent_extra() -> None:
    # the README's first command: `serve` with no key answers from the emulator, with the
    # agent extra's packages impossible to import (as if `pip install .` alone had run)
    script = (
        "import sys\n"
        "for name in ('chatkit', 'agents', 'openai'): sys.modules[name] = None\n"
        "from healthagent_service.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--listen", address],
        env=clean_env(HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    answer = ""
    try:
        wait_serving(address, timeout=30)
        answer = _answer(address, "hello emulator")
    except (TimeoutError, grpc.RpcError):
        pass  # the log below says why
    finally:
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=30)[1].decode()
    assert answer.startswith("You said: hello emulator."), log
    assert process.returncode == 0 and "Traceback" not in log, log


def _run_without_chatkit(*arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
    # `sys.modules[name] = None` is Python's own way of making an import fail: as if the
    # agent extra were not installed
    script = (
        "import sys; sys.modules['chatkit'] = None; "
        "from healthagent_service.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", script, *arguments],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("arguments", "env"),
    [
        (("serve", "--listen", "127.0.0.1:0"), {"HEALTHAGENT_UPSTREAM": "agent"}),
        (("serve", "--listen", "127.0.0.1:0"), {"OPENAI_API_KEY": "sk-unused"}),
        (("agent", "--listen", "127.0.0.1:0"), {}),
    ],
)
def test_agent_mode_without_the_extra_stops_at_once_with_the_install_command(
    arguments: tuple[str, ...], env: dict[str, str]
) -> None:
    started = time.monotonic()
    result = _run_without_chatkit(*arguments, **env)
    assert result.returncode == 2, result.stderr
    assert AGENT_EXTRA_INSTALL in result.stderr and "chatkit" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_the_agent_child_of_serve_serves_its_own_metrics_beside_the_services() -> None:
    # the child inherits serve's environment: its own setting, so the two never share a port
    service_port, agent_port = free_port(), free_port()
    server = start_serve(
        HEALTHAGENT_UPSTREAM="agent",
        HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="1",
        HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS="0",
        HEALTHAGENT_METRICS_LISTEN=f"127.0.0.1:{service_port}",
        HEALTHAGENT_AGENT_METRICS_LISTEN=f"127.0.0.1:{agent_port}",
    )
    try:
        assert _answer(server.address, "count me").startswith("You said: count me.")
        service = httpx.get(f"http://127.0.0.1:{service_port}/metrics", timeout=5).text
        agent = httpx.get(f"http://127.0.0.1:{agent_port}/metrics", timeout=5).text
    finally:
        status = server.terminate()
    assert status == 0, server.log()
    assert "healthagent_active_streams" in service and "healthagent_agent_" not in service
    assert 'healthagent_agent_turns_total{outcome="completed"} 1.0' in agent
    assert 'healthagent_agent_requests_total{operation="threads.create",' in agent


def test_the_agent_server_refuses_to_listen_off_loopback_without_the_credential() -> None:
    result = subprocess.run(
        [HEALTHAGENT, "agent", "--listen", "0.0.0.0:0"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "HEALTHAGENT_CHATKIT_AUTH_HEADER" in result.stderr


@pytest.mark.parametrize(
    ("env", "upstream"),
    [
        ({}, UpstreamKind.EMULATOR),
        ({"OPENAI_API_KEY": "sk-x"}, UpstreamKind.AGENT),
        ({"OPENAI_API_KEY": "sk-x", "OPENAI_WORKFLOW_ID": "wf_1"}, UpstreamKind.CHATKIT),
        ({"HEALTHAGENT_CHATKIT_URL": "http://127.0.0.1:1/chatkit"}, UpstreamKind.CHATKIT),
        ({"OPENAI_API_KEY": "sk-x", "HEALTHAGENT_UPSTREAM": "realtime"}, UpstreamKind.REALTIME),
    ],
)
def test_a_key_alone_means_the_agent(env: dict[str, str], upstream: UpstreamKind) -> None:
    settings = make_settings(**env)
    assert settings.upstream.effective_kind is upstream
    assert settings.upstream.supervises_agent is (upstream is UpstreamKind.AGENT)
