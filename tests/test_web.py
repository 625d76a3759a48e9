"""The HTTP listener over real sockets: gRPC-Web (binary and text) for every RPC, CORS, the
seeds' SSE and JSON contract, disconnects and deadlines, all forwarded to the gRPC server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import subprocess
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.service import Service, ServiceFactory, emulator_env
from tests.support.web_clients import TEXT, WebReply, grpc_web, sse

API_KEY = "web-test-api-key"
API_KEYS = [{"principal": "web", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]
ORIGIN = "https://app.example"
SEED = "/functions/v1/health-agent"


async def web_service(
    emulator: ChatKitEmulator, start_service: ServiceFactory, **env: Any
) -> tuple[Service, str]:
    service = await start_service(
        **emulator_env(
            emulator,
            HEALTHAGENT_HTTP_LISTEN="127.0.0.1:0",
            HEALTHAGENT_HTTP_CORS_ORIGINS=f"{ORIGIN}, http://localhost:3000",
            **env,
        )
    )
    assert service.running.web is not None
    return service, f"http://127.0.0.1:{service.running.web.port}"


def chat_events(reply: WebReply) -> list[pb.ChatResponse]:
    return [pb.ChatResponse.FromString(message) for message in reply.messages]


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_every_rpc_over_grpc_web(
    text: bool, emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    service = "healthagent.v1.HealthAgent"
    async with httpx.AsyncClient(timeout=30) as client:
        minted = await grpc_web(
            client, base, f"{service}/MintSession", pb.MintSessionRequest(user="web"), text=text
        )
        assert minted.http_status == 200 and minted.grpc_status == 0
        assert minted.headers["content-type"] == (TEXT if text else "application/grpc-web+proto")
        assert pb.MintSessionResponse.FromString(minted.messages[0]).client_secret
        chat = await grpc_web(
            client, base, f"{service}/Chat", pb.ChatRequest(user="web", message="hi"), text=text
        )
        events = chat_events(chat)
        assert chat.grpc_status == 0 and events[-1].response_done.text.startswith("You said: hi")
        conversation_id = events[0].session.conversation_id
        listed = await grpc_web(
            client, base, f"{service}/ListConversations", pb.ListConversationsRequest(user="web")
        )
        page = pb.ListConversationsResponse.FromString(listed.messages[0])
        assert [c.id for c in page.conversations] == [conversation_id]
        one = pb.GetConversationRequest(user="web", conversation_id=conversation_id)
        got = await grpc_web(client, base, f"{service}/GetConversation", one, text=text)
        assert (
            len(pb.GetConversationResponse.FromString(got.messages[0]).conversation.messages) == 2
        )
        export = pb.ExportConversationRequest(user="web", conversation_id=conversation_id)
        exported = await grpc_web(client, base, f"{service}/ExportConversation", export, text=text)
        assert exported.grpc_status == 0 and exported.messages
        deleted = await grpc_web(
            client,
            base,
            f"{service}/DeleteConversation",
            pb.DeleteConversationRequest(user="web", conversation_id=conversation_id),
            text=text,
        )
        assert deleted.grpc_status == 0
        revoked = await grpc_web(
            client,
            base,
            f"{service}/RevokeSessions",
            pb.RevokeSessionsRequest(user="web"),
            text=text,
        )
        assert pb.RevokeSessionsResponse.FromString(revoked.messages[0]).revoked_sessions >= 1
        health = await grpc_web(
            client,
            base,
            "grpc.health.v1.Health/Check",
            health_pb2.HealthCheckRequest(service=service),
            text=text,
        )
        status = health_pb2.HealthCheckResponse.FromString(health.messages[0]).status
        assert status == health_pb2.HealthCheckResponse.SERVING


async def test_errors_carry_their_google_rpc_details(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    async with httpx.AsyncClient(timeout=30) as client:
        # refused before any message: trailers-only, the status in the HTTP headers
        refused = await grpc_web(
            client, base, "healthagent.v1.HealthAgent/Chat", pb.ChatRequest(user="web", message="")
        )
        assert refused.messages == [] and refused.http_status == 200
        assert refused.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert refused.reason() == "INVALID_REQUEST"
        assert refused.violations() == [("message", "must not be empty")]
        # failed mid-stream: messages, then the status in the trailers frame
        dropped = await grpc_web(
            client,
            base,
            "healthagent.v1.HealthAgent/Chat",
            pb.ChatRequest(user="web", message="[drop]"),
            text=True,
        )
        assert len(chat_events(dropped)) >= 2
        assert dropped.grpc_status == grpc.StatusCode.UNAVAILABLE.value[0]
        assert dropped.reason() == "UPSTREAM_STREAM_TRUNCATED"
        assert dropped.trailers["grpc-message"].startswith("the upstream stream ended")
        # a body that is not one gRPC-Web frame is the caller's mistake, with a field
        broken = await client.post(
            f"{base}/healthagent.v1.HealthAgent/Chat",
            content=b"\x00\x00\x00\x00\x09short",
            headers={"content-type": "application/grpc-web+proto"},
        )
        assert broken.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert "exactly one uncompressed message frame" in broken.headers["grpc-message"]
        # a frame whose message does not decode: the service's own refusal, with its field
        corrupt = await grpc_web(client, base, "healthagent.v1.HealthAgent/Chat", b"\x0a\xff")
        assert corrupt.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert corrupt.reason() == "INVALID_REQUEST"


async def test_the_callers_credentials_and_request_id_are_metadata(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service, HEALTHAGENT_API_KEYS=API_KEYS)
    request = pb.MintSessionRequest(user="web")
    async with httpx.AsyncClient(timeout=30) as client:
        anonymous = await grpc_web(client, base, "healthagent.v1.HealthAgent/MintSession", request)
        assert anonymous.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
        signed_in = await grpc_web(
            client,
            base,
            "healthagent.v1.HealthAgent/MintSession",
            request,
            headers={"authorization": f"Bearer {API_KEY}", "x-request-id": "web-req-1"},
        )
        assert signed_in.grpc_status == 0
        assert signed_in.trailers.get("x-request-id") == "web-req-1"


async def test_a_stream_arrives_as_it_is_sent(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await grpc_web(
            client,
            base,
            "healthagent.v1.HealthAgent/Chat",
            pb.ChatRequest(user="web", message="[pace=100][chunks=6]"),
        )
    chunks = [
        at for at, event in zip(reply.arrivals, chat_events(reply), strict=True) if event.chunk.text
    ]
    assert len(chunks) == 6
    assert reply.ended_at - chunks[0] > 0.4  # the first chunk came half a second before the end


async def test_grpc_timeout_is_the_calls_deadline(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await grpc_web(
            client,
            base,
            "healthagent.v1.HealthAgent/Chat",
            pb.ChatRequest(user="web", message="[pace=200][chunks=50]"),
            headers={"grpc-timeout": "500m"},
        )
        assert reply.grpc_status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        bad = await grpc_web(
            client,
            base,
            "healthagent.v1.HealthAgent/MintSession",
            pb.MintSessionRequest(user="web"),
            headers={"grpc-timeout": "soon"},
        )
        assert bad.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.parametrize("way", ["grpc-web", "sse"])
async def test_a_browser_that_leaves_cancels_the_call_and_the_turn_is_kept_incomplete(
    emulator: ChatKitEmulator, start_service: ServiceFactory, way: str
) -> None:
    service, base = await web_service(emulator, start_service)
    disconnects = emulator.stats.streams_disconnected
    message = "[pace=50][chunks=400]"
    async with httpx.AsyncClient(timeout=30) as client:
        if way == "grpc-web":
            reply = await grpc_web(
                client,
                base,
                "healthagent.v1.HealthAgent/Chat",
                pb.ChatRequest(user="web", message=message),
                stop_after=8,
            )
            assert any(event.chunk.text for event in chat_events(reply))
            conversation_id = chat_events(reply)[0].session.conversation_id
        else:
            body = {"message": message, "user": "web", "stream": True}
            _, events, _ = await sse(client, base + SEED, body, stop_after=8)
            assert [event.name for event in events][-1] == "chunk"
            conversation_id = events[0].data["conversationId"]
    for _ in range(100):
        if emulator.stats.streams_disconnected > disconnects:
            break
        await asyncio.sleep(0.02)
    assert emulator.stats.streams_disconnected == disconnects + 1
    for _ in range(100):
        history = await service.stub.GetConversation(
            pb.GetConversationRequest(user="web", conversation_id=conversation_id)
        )
        answer = history.conversation.messages[-1]
        if answer.error_reason:
            break
        await asyncio.sleep(0.02)
    assert answer.error_reason == "CANCELLED" and answer.status == pb.MESSAGE_STATUS_INCOMPLETE
    assert answer.text


async def test_cors_preflight_and_exposed_headers(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    async with httpx.AsyncClient(timeout=30) as client:
        preflight = await client.options(
            f"{base}/healthagent.v1.HealthAgent/Chat",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": (
                    "authorization,content-type,x-grpc-web,x-user-agent,grpc-timeout"
                ),
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        allowed = preflight.headers["access-control-allow-headers"].lower()
        for header in ("authorization", "x-grpc-web", "x-user-agent", "grpc-timeout"):
            assert header in allowed
        stranger = await client.options(
            f"{base}/healthagent.v1.HealthAgent/Chat",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in stranger.headers
        reply = await grpc_web(
            client,
            base,
            "healthagent.v1.HealthAgent/MintSession",
            pb.MintSessionRequest(user="web"),
            headers={"origin": ORIGIN},
        )
        exposed = reply.headers["access-control-expose-headers"].lower()
        for header in ("grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id"):
            assert header in exposed


# -- the seeds' contract ----------------------------------------------------------------------


async def test_the_seeds_sse_contract_event_by_event(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    body = {"message": "Hello, I need health advice", "user": "test-user-123", "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        response, events, _ = await sse(client, base + SEED, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers and "content-length" not in response.headers
    names = [event.name for event in events]
    assert names[0] == "session" and names[-2:] == ["response_done", "done"]
    assert set(names[1:-3]) == {"chunk"} and names[-3] == "text_done"
    session = events[0].data
    assert session["userId"] == "test-user-123" and session["workflowId"]
    assert session["sessionId"] and session["conversationId"]
    text = "".join(event.data["text"] for event in events if event.name == "chunk")
    assert events[-3].data == {"text": text, "sessionId": session["sessionId"]}
    assert events[-2].data["sessionId"] == session["sessionId"]
    assert events[-2].data["response"]["text"] == text
    assert events[-1].data == {"sessionId": session["sessionId"]}
    assert [event.event_id for event in events] == [str(n) for n in range(1, len(events) + 1)]
    # continuing the conversation
    again = {**body, "message": "and more", "conversationId": session["conversationId"]}
    async with httpx.AsyncClient(timeout=30) as client:
        _, events, _ = await sse(client, base + SEED, again)
    assert events[0].data["conversationId"] == session["conversationId"]


async def test_the_seeds_tool_call_and_notice_events(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    body = {"message": "[notice] how active? [tool]", "user": "u1", "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        _, events, _ = await sse(client, base + SEED, body)
        names = [event.name for event in events]
        assert "notice" in names and "tool_call" in names and names[-1] == "done"
        call = next(event.data for event in events if event.name == "tool_call")
        assert call["name"] == "get_health_data" and call["arguments"] == {
            "metric": "steps",
            "days": 7,
        }
        assert events[-2].data["response"]["awaitingToolOutput"] is True
        answer = {
            "user": "u1",
            "stream": True,
            "conversationId": call["conversationId"],
            "toolOutput": {"callId": call["callId"], "output": {"steps": [1, 2]}},
        }
        _, events, _ = await sse(client, base + SEED, answer)
    assert events[-2].data["response"]["text"] == 'Thanks. The tool returned {"steps": [1, 2]}.'


async def test_a_failure_after_the_stream_began_is_an_error_event_without_done(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    body = {"message": "tell me [ratelimit]", "user": "u2", "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        refused, _, _ = await sse(client, base + SEED, {**body, "message": ""})
        assert refused.status_code == 400
        assert refused.json()["violations"] == [
            {"field": "message", "description": "must not be empty"}
        ]
        # an upstream failure after the session event went out: in-band
        _, events, _ = await sse(client, base + SEED, {**body, "message": "hello [drop]"})
    names = [event.name for event in events]
    assert names[0] == "session" and "chunk" in names and names[-1] == "error"
    assert "done" not in names and "response_done" not in names
    error = events[-1].data
    assert error["code"] == "UNAVAILABLE" and error["reason"] == "UPSTREAM_STREAM_TRUNCATED"
    assert error["retryAfter"] == 1.0 and error["message"]


async def test_a_failure_before_the_stream_is_an_http_status_with_json(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service, HEALTHAGENT_API_KEYS=API_KEYS)
    body = {"message": "hi", "user": "u3", "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(base + SEED, json=body)
        assert response.status_code == 401
        assert response.json()["code"] == "UNAUTHENTICATED" and not response.json()["success"]
        response = await client.post(
            base + SEED, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["violations"][0]["field"] == "body"
        response = await client.post(
            base + SEED,
            json={**body, "message": "[ratelimit]"},
            headers={"authorization": f"Bearer {API_KEY}"},
        )
        assert response.status_code == 429 and response.json()["retryAfter"] == 2.0
        assert response.json()["reason"] == "UPSTREAM_RATE_LIMITED"


async def test_heartbeats_keep_a_silent_stream_alive(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service, HEALTHAGENT_HTTP_HEARTBEAT_SECONDS=0.5)
    async with httpx.AsyncClient(timeout=30) as client:
        # the emulator holds the first byte for 5 s: headers go out after 2 s, then pings
        _, events, comments = await sse(
            client, base + SEED, {"message": "wait [slow]", "user": "u4", "stream": True}
        )
    assert len(comments) >= 4 and set(comments) == {": ping"}
    assert [event.name for event in events][-1] == "done"


async def test_the_seeds_curl_commands_work_as_written(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    anon_jwt = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJzdXBhYmFzZS1kZW1vIiwicm9sZSI6ImFub24iLCJ"
        "leHAiOjE5ODM4MTI5OTZ9.CRXP1A7WOeoJeXxjNni43kdQwgnWNReilDMblYTn_I0"
    )
    commands = {
        "000 non-streaming": f"curl -i --location --request POST '{base}{SEED}' "
        f"--header 'Authorization: Bearer {anon_jwt}' --header 'Content-Type: application/json' "
        """--data '{"message": "Hello, I need health advice", "user": "test-user-123", """
        """"stream": false}'""",
        "000 streaming": f"curl -N --location --request POST '{base}{SEED}' "
        f"--header 'Authorization: Bearer {anon_jwt}' --header 'Content-Type: application/json' "
        """--data '{"message": "Hello, I need health advice", "user": "test-user-123", """
        """"stream": true}'""",
        "001 mint": f"curl -i --request POST '{base}{SEED}' "
        """--header 'Content-Type: application/json' --data '{"device_id": "test-123"}'""",
    }
    outputs = {}
    for name, command in commands.items():
        result = await asyncio.to_thread(
            subprocess.run, shlex.split(command), capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout
    assert "HTTP/1.1 200" in outputs["000 non-streaming"]
    minted = json.loads(outputs["000 non-streaming"].split("\n\n", 1)[1])
    assert minted["success"] is True and minted["session"]["client_secret"]
    assert minted["session"]["user"] == "test-user-123" and minted["session"]["workflow"]["id"]
    assert minted["message"] == "Session created successfully"
    assert "event: session" in outputs["000 streaming"]
    assert (
        outputs["000 streaming"].rstrip().endswith('"}')
        and "event: done" in outputs["000 streaming"]
    )
    secret = json.loads(outputs["001 mint"].split("\n\n", 1)[1])
    assert secret["client_secret"].startswith("ek_") and secret["user"] == "test-123"
    assert set(secret["session"]) == {"id", "expires_at", "ttl_seconds"}
    assert secret["session"]["expires_at"].endswith("Z") and secret["workflow_id"]


async def test_the_listener_refuses_off_loopback_without_authentication(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    with pytest.raises(ValueError, match="without caller authentication"):
        await start_service(**emulator_env(emulator, HEALTHAGENT_HTTP_LISTEN="0.0.0.0:0"))


async def test_metadata_that_grpc_cannot_carry_is_the_callers_mistake(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    async with httpx.AsyncClient(timeout=30) as client:
        request = pb.MintSessionRequest(user="web").SerializeToString()
        reply = await client.post(
            f"{base}/healthagent.v1.HealthAgent/MintSession",
            content=len(request).to_bytes(5, "big") + request,
            headers={
                b"content-type": b"application/grpc-web+proto",
                b"x-client-name": "caf\u00e9".encode("latin-1"),
            },
        )
    assert reply.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "x-client-name" in reply.headers["grpc-message"]


async def test_without_authentication_only_this_machine_and_json_get_in(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    _, base = await web_service(emulator, start_service)
    body = b'{"message": "hi", "user": "u5", "stream": false}'
    async with httpx.AsyncClient(timeout=30) as client:
        # a page on another site may POST text/plain without a preflight: refused
        plain = await client.post(base + SEED, content=body, headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        # a name rebound to 127.0.0.1 still sends its own Host: refused while auth is off
        rebound = await client.post(
            base + SEED,
            content=body,
            headers={"content-type": "application/json", "host": "evil.example"},
        )
        assert rebound.status_code == 421
        web = await client.post(
            f"{base}/healthagent.v1.HealthAgent/MintSession",
            content=b"",
            headers={"content-type": "application/grpc-web+proto", "host": "evil.example:80"},
        )
        assert web.status_code == 421
        ok = await client.post(
            base + SEED, content=body, headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200 and ok.json()["success"] is True
