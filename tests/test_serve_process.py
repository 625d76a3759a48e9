"""`healthagent serve` as a process on the embedded emulator, reached with pytest-grpc's sync
stub fixtures, the CLI, and the real grpcurl binary (server reflection)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import (
    HEALTHAGENT,
    ServeProcess,
    clean_env,
    free_port,
    port_sockets,
    start_serve,
)
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from tests.support.sockets import leave_time_wait

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


@pytest.fixture(scope="module")
def serve_process() -> Iterator[ServeProcess]:
    server = start_serve(HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="1")
    yield server
    assert server.terminate() == 0
    assert "Traceback" not in server.log()


# pytest-grpc fixtures: point its channel at the running process instead of its own server.
@pytest.fixture(scope="module")
def grpc_addr(serve_process: ServeProcess) -> str:
    return serve_process.address


@pytest.fixture(scope="module")
def grpc_server(serve_process: ServeProcess) -> ServeProcess:
    return serve_process


@pytest.fixture(scope="module")
def grpc_stub_cls() -> type[pb_grpc.HealthAgentStub]:
    return pb_grpc.HealthAgentStub


def test_first_log_line_says_replies_are_simulated(serve_process: ServeProcess) -> None:
    first = json.loads(serve_process.log().splitlines()[0])
    assert first["upstream"] == "emulator" and "simulated" in first["event"]
    assert first["level"] == "warning"
    print(f"serve reached SERVING in {serve_process.seconds_to_serving:.2f} s")


def test_sync_stub_mint_and_chat(grpc_stub: pb_grpc.HealthAgentStub) -> None:
    minted = grpc_stub.MintSession(pb.MintSessionRequest(user="sync-user"))
    assert minted.client_secret and minted.session.ttl_seconds > 0
    events = list(grpc_stub.Chat(pb.ChatRequest(message="hello", user="sync-user")))
    assert events[0].session.session_id == minted.session.id
    assert events[-1].response_done.text.startswith("You said: hello.")


def test_logs_are_json_with_request_ids(
    grpc_stub: pb_grpc.HealthAgentStub, serve_process: ServeProcess
) -> None:
    list(
        grpc_stub.Chat(
            pb.ChatRequest(message="log me", user="log-user"),
            metadata=(("x-request-id", "trace-77"),),
        )
    )
    time.sleep(0.2)
    lines = [json.loads(line) for line in serve_process.log().splitlines()]
    mine = [line for line in lines if line.get("request_id") == "trace-77"]
    assert {line["event"] for line in mine} >= {"chat started", "chat finished"}
    assert all("client_secret" not in line for line in lines)
    secrets = [e.get("client_secret") for e in lines]
    assert not any(secrets)


def test_cli_chat_and_mint(serve_process: ServeProcess) -> None:
    chat = subprocess.run(
        [
            HEALTHAGENT,
            "chat",
            "--target",
            serve_process.address,
            "--user",
            "cli",
            "hi from the cli",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == (
        "You said: hi from the cli. This reply comes from the HealthAgent emulator."
    )
    assert "[conversation thr_" in chat.stderr
    mint = subprocess.run(
        [HEALTHAGENT, "mint", "--target", serve_process.address, "--user", "cli"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert mint.returncode == 0, mint.stderr
    answer = json.loads(mint.stdout)
    assert answer["user"] == "cli" and answer["session"]["id"].startswith("cksess_")
    failing = subprocess.run(
        [HEALTHAGENT, "chat", "--target", serve_process.address, "--user", "", "hi"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert failing.returncode == 1 and "INVALID_ARGUMENT" in failing.stderr


def grpcurl(*args: str) -> str:
    result = subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_list_describe_and_call(serve_process: ServeProcess) -> None:
    address = serve_process.address
    services = grpcurl("-plaintext", address, "list").split()
    assert "healthagent.v1.HealthAgent" in services and "grpc.health.v1.Health" in services
    described = grpcurl("-plaintext", address, "describe", "healthagent.v1.HealthAgent")
    assert "rpc MintSession" in described and "stream .healthagent.v1.ChatResponse" in described
    message = grpcurl("-plaintext", address, "describe", "healthagent.v1.MintSessionResponse")
    assert "client_secret" in message
    minted = json.loads(
        grpcurl(
            "-plaintext",
            "-d",
            '{"user": "grpcurl-user"}',
            address,
            "healthagent.v1.HealthAgent/MintSession",
        )
    )
    assert minted["user"] == "grpcurl-user" and minted["client_secret"]
    chat = grpcurl(
        "-plaintext",
        "-d",
        '{"user": "grpcurl-user", "message": "hi"}',
        address,
        "healthagent.v1.HealthAgent/Chat",
    )
    assert '"response_done"' in chat


def test_sigterm_drains_in_flight_streams() -> None:
    server = start_serve(
        HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="10",
        HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS="1",
        HEALTHAGENT_SHUTDOWN_GRACE_SECONDS="20",
    )
    results: dict[str, object] = {}

    def long_chat() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthAgentStub(channel)
            try:
                events = list(stub.Chat(pb.ChatRequest(message="[chunks=250]", user="drain")))
                results["last"] = events[-1].WhichOneof("event")
                results["chunks"] = sum(e.WhichOneof("event") == "chunk" for e in events)
            except grpc.RpcError as error:
                results["error"] = error.code()

    worker = threading.Thread(target=long_chat)
    worker.start()
    time.sleep(0.5)  # the stream is under way (250 chunks x 10 ms)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with grpc.insecure_channel(server.address) as channel:
        # During the drain period health says NOT_SERVING, so load balancers move away.
        health: Any = health_pb2_grpc.HealthStub(channel)
        for name in ("", "healthagent.v1.HealthAgent"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=1).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    time.sleep(1.2)  # drain over: new calls are refused, the in-flight stream goes on
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.HealthAgentStub(channel).MintSession(pb.MintSessionRequest(user="late"), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    worker.join(30)
    assert server.process.wait(30) == 0
    assert results == {"last": "response_done", "chunks": 250}
    log = server.log()
    assert "shutting down" in log and "Traceback" not in log


def test_the_default_sixteen_grpc_servers_share_the_port_and_all_serve(
    serve_process: ServeProcess,
) -> None:
    port = int(serve_process.address.rpartition(":")[2])
    assert len(port_sockets(port)) == 16
    # The kernel hands each connection to one of the sixteen listeners: 250 connections miss
    # one of them with odds of 2 in 10^6, and a call on a listener whose server is not serving
    # would time out.
    for index in range(250):
        options = [("test.channel", index)]  # else gRPC shares one connection among them
        with grpc.insecure_channel(serve_process.address, options=options) as channel:
            request = pb.ChatRequest(message="[chunks=1] hi", user=f"spread-{index}")
            events = list(pb_grpc.HealthAgentStub(channel).Chat(request, timeout=10))
            assert events[-1].WhichOneof("event") == "response_done"


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["after-one-server", "after-shared"])
def test_serve_restarts_on_a_port_where_old_connections_linger(shared: bool) -> None:
    # TIME_WAIT made on purpose: which side of a real connection closes first is a race
    port = leave_time_wait(reuse_port=shared)
    server = start_serve(f"127.0.0.1:{port}")
    assert server.terminate() == 0


def test_bad_settings_and_taken_port_refuse_to_start(serve_process: ServeProcess) -> None:
    bad = subprocess.run(
        [HEALTHAGENT, "serve", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(HEALTHAGENT_UPSTREAM="bogus"),
    )
    assert bad.returncode == 2
    assert "invalid setting HEALTHAGENT_UPSTREAM" in bad.stderr
    # the port is held by sixteen servers sharing it (SO_REUSEPORT); neither another group of
    # them nor a single server may join
    for servers in ("16", "4", "1"):
        assert_refused_to_start(serve_process.address, HEALTHAGENT_GRPC_SERVERS=servers)
    single = start_serve(HEALTHAGENT_GRPC_SERVERS="1")
    try:
        assert len(port_sockets(int(single.address.rpartition(":")[2]))) == 1
        assert_refused_to_start(single.address)
    finally:
        assert single.terminate() == 0


def assert_refused_to_start(address: str, **env: str) -> None:
    """`serve` on a taken `address` exits 2 at once, saying it cannot start."""
    taken = subprocess.run(
        [HEALTHAGENT, "serve", "--listen", address],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**env),
    )
    assert taken.returncode == 2, (env, taken.returncode, taken.stderr[-2000:])
    assert "cannot start" in taken.stderr, (env, taken.stderr[-2000:])


def test_standalone_emulator_command() -> None:
    import openai

    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            HEALTHAGENT,
            "emulator",
            "--listen",
            address,
            "--api-key",
            "sk-cli",
            "--workflow",
            "wf_cli",
        ],
        stdout=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert process.stdout is not None
        banner = json.loads(process.stdout.readline())
        assert banner["OPENAI_BASE_URL"] == f"http://{address}/v1"
        assert banner["OPENAI_REALTIME_URL"].startswith("ws://127.0.0.1:")
        assert "wf_cli" in banner["workflows"] and "sk-cli" not in json.dumps(banner)
        client = openai.OpenAI(api_key="sk-cli", base_url=banner["OPENAI_BASE_URL"], max_retries=0)
        session = client.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_cli"})
        assert session.status == "active"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"HEALTHAGENT_DATABASE_URL": "postgresql://postgres@127.0.0.1:{port}/test"}, None),
        (
            {"HEALTHAGENT_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/no_such_db_23"},
            None,
        ),
        ({"HEALTHAGENT_REDIS_URL": "redis://127.0.0.1:{port}/0"}, None),
        ({"HEALTHAGENT_DATA_DIR": "/proc/version/data"}, None),  # not a directory
        ({"HEALTHAGENT_API_KEYS": "not json"}, None),
        ({"HEALTHAGENT_REALTIME_TOOLS": "[{{"}, None),
        (
            {
                "HEALTHAGENT_TLS_CERT_FILE": "/nonexistent.pem",
                "HEALTHAGENT_TLS_KEY_FILE": "/no.pem",
            },
            "HEALTHAGENT_TLS_KEY_FILE",
        ),
    ],
    ids=[
        "postgres-down",
        "postgres-no-db",
        "redis-down",
        "data-dir",
        "api-keys",
        "realtime-tools",
        "tls",
    ],
)
def test_start_up_failures_exit_2_naming_the_setting(
    settings: dict[str, str], named: str | None
) -> None:
    """A dependency that is not there or a setting that is not valid stops `serve` with
    status 2 and a line naming the setting, not status 1 and a traceback (issue 23, item 9)."""
    env = {name: value.format(port=free_port()) for name, value in settings.items()}
    result = subprocess.run(
        [HEALTHAGENT, "serve", "--listen", f"127.0.0.1:{free_port()}"],
        env=clean_env(**env),
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert (named or next(iter(settings))) in stderr
    assert "Traceback" not in stderr
