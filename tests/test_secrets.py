"""Secrets never leak: a canary key, JWT secret and API key go through the scenarios of the
suite against real processes, and no log line or status carries them, nor any client secret."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest

from harness.processes import (
    HEALTHAGENT,
    EmulatorProcess,
    ServeProcess,
    clean_env,
    free_port,
    start_emulator_process,
    start_serve,
)
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.security.auth import hash_api_key
from healthagent_service.security.redaction import SecretRedactor

CANARY_KEY = f"sk-canary-{secrets.token_hex(16)}"
CANARY_JWT_SECRET = f"jwt-canary-{secrets.token_hex(16)}"
CANARY_SERVICE_KEY = f"hak_canary_{secrets.token_hex(16)}"
CANARY_DB_PASSWORD = f"dbcanary{secrets.token_hex(8)}"


@pytest.fixture
def canary_emulator() -> Iterator[EmulatorProcess]:
    emulator = start_emulator_process(chunk_delay_ms="1", api_key=CANARY_KEY, workflow="wf_canary")
    yield emulator
    emulator.stop()


def user_token(sub: str) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time()) + 300}, CANARY_JWT_SECRET, algorithm="HS256"
    )


class Recorder:
    """Runs calls and keeps everything a caller could see of failures."""

    def __init__(self, stub: pb_grpc.HealthAgentStub) -> None:
        self.stub = stub
        self.statuses: list[str] = []
        self.minted: list[str] = []

    def call(self, method: str, request: Any, token: str | None) -> list[Any]:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            result = getattr(self.stub, method)(request, metadata=metadata, timeout=20)
            return list(result) if method == "Chat" else [result]
        except grpc.RpcError as error:
            failure: Any = error
            trailers = {item[0]: item[1] for item in failure.trailing_metadata() or ()}
            self.statuses.append(
                f"{failure.code()} {failure.details()} "
                f"{trailers.get('grpc-status-details-bin', b'')!r}"
            )
            return []


def run_scenarios(recorder: Recorder) -> None:
    alice = user_token("alice")
    for kind in (pb.SESSION_KIND_CHATKIT, pb.SESSION_KIND_REALTIME):
        for minted in recorder.call(
            "MintSession", pb.MintSessionRequest(user="alice", kind=kind), alice
        ):
            recorder.minted.append(minted.client_secret)
    events = recorder.call("Chat", pb.ChatRequest(message="hello [tool]", user="alice"), alice)
    conversation = events[0].session.conversation_id if events else "missing"
    call_id = next(
        (e.tool_call.call_id for e in events if e.WhichOneof("event") == "tool_call"), "c"
    )
    recorder.call(
        "Chat",
        pb.ChatRequest(
            user="alice",
            conversation_id=conversation,
            tool_output=pb.ToolOutput(call_id=call_id, output_json="1"),
        ),
        alice,
    )
    for trigger in (
        "[error]",
        "[drop]",
        "[fatal]",
        "[malformed]",
        "[http 429]",
        "[http 500]",
        "[notice]",
        "[ratelimit]",
    ):
        recorder.call(
            "Chat",
            pb.ChatRequest(message=trigger, user="alice", conversation_id=conversation),
            alice,
        )
    for request_token in (
        None,
        "garbage",
        CANARY_KEY,
        user_token("mallory"),
        jwt.encode({"sub": "x", "exp": 1}, CANARY_JWT_SECRET),
    ):
        recorder.call("MintSession", pb.MintSessionRequest(user="alice"), request_token)
    recorder.call("MintSession", pb.MintSessionRequest(user="bob"), CANARY_SERVICE_KEY)
    recorder.call(
        "GetConversation",
        pb.GetConversationRequest(user="alice", conversation_id=conversation),
        alice,
    )
    recorder.call(
        "ExportConversation",
        pb.ExportConversationRequest(
            user="alice", conversation_id=conversation, format=pb.EXPORT_FORMAT_MARKDOWN
        ),
        alice,
    )
    recorder.call(
        "ListConversations", pb.ListConversationsRequest(user="alice", page_token="bad"), alice
    )
    recorder.call("RevokeSessions", pb.RevokeSessionsRequest(user="alice"), alice)


def test_no_secret_in_any_log_line_or_status(canary_emulator: EmulatorProcess) -> None:
    base = {
        "OPENAI_BASE_URL": canary_emulator.base_url,
        "OPENAI_REALTIME_URL": canary_emulator.realtime_url,
        "OPENAI_WORKFLOW_ID": "wf_canary",
        "HEALTHAGENT_AUTH_JWT_SECRET": CANARY_JWT_SECRET,
        "HEALTHAGENT_API_KEYS": json.dumps(
            [{"principal": "svc", "sha256": hash_api_key(CANARY_SERVICE_KEY)}]
        ),
        "HEALTHAGENT_LOG_LEVEL": "debug",
    }
    servers: list[ServeProcess] = []
    recorders: list[Recorder] = []
    for upstream, api_key in (
        ("chatkit", CANARY_KEY),
        ("chatkit", CANARY_KEY + "-wrong"),
        ("realtime", CANARY_KEY),
    ):
        server = start_serve(**base, OPENAI_API_KEY=api_key, HEALTHAGENT_UPSTREAM=upstream)
        servers.append(server)
        with grpc.insecure_channel(server.address) as channel:
            recorder = Recorder(pb_grpc.HealthAgentStub(channel))
            run_scenarios(recorder)
            recorders.append(recorder)
    # A database URL with a password that cannot connect: start-up fails, and says why.
    failed = subprocess.run(
        [HEALTHAGENT, "serve", "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(
            **base,
            OPENAI_API_KEY=CANARY_KEY,
            HEALTHAGENT_DATABASE_URL=(
                f"postgresql://u:{CANARY_DB_PASSWORD}@127.0.0.1:{free_port()}/x"
            ),
        ),
    )
    assert failed.returncode != 0
    logs = "\n".join(server.log() for server in servers) + failed.stdout + failed.stderr
    for server in servers:
        assert server.terminate() == 0
    logs += "\n".join(server.log() for server in servers)
    statuses = "\n".join(s for r in recorders for s in r.statuses)
    minted = [secret for r in recorders for secret in r.minted]
    assert len(minted) == 4 and len(recorders[0].statuses) > 10  # the scenarios really ran
    assert len(recorders[2].statuses) > 5  # the Realtime ones too
    assert "chat finished" in logs and "rpc failed" in logs
    for secret in (
        CANARY_KEY,
        CANARY_JWT_SECRET,
        CANARY_SERVICE_KEY,
        CANARY_DB_PASSWORD,
        user_token("alice")[:40],
        *minted,
    ):
        assert secret not in logs, secret[:12]
        assert secret not in statuses, secret[:12]


def test_redactor_catches_credential_shapes() -> None:
    redactor = SecretRedactor()
    redactor.add(["configured-secret-value"])
    line = (
        "Incorrect API key provided: sk-proj-abcdefghijklmnop; secret ek_0123456789abcdef; "
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz; configured-secret-value; "
        "postgresql://user:hunter2hunter2@db:5432/x; token "
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    )
    cleaned = redactor.redact(line)
    for secret in (
        "sk-proj-abcdefghijklmnop",
        "ek_0123456789abcdef",
        "abcdefghijklmnopqrstuvwxyz",
        "configured-secret-value",
        "hunter2hunter2",
        "eyJhbGciOiJIUzI1NiJ9",
    ):
        assert secret not in cleaned
    event = redactor(
        None,
        "info",
        {"event": "x", "client_secret": "s3cr3t", "nested": {"authorization": "abc", "ok": "fine"}},
    )
    assert event["client_secret"] == "[redacted]" and event["nested"] == {
        "authorization": "[redacted]",
        "ok": "fine",
    }
