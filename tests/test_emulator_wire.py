"""The emulator against the references: the official `openai-chatkit` server (same bytes on the
wire for the same script) and the official `openai` SDK (parses its session answers)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.upstream.chatkit import FORWARDED_USER_HEADER
from tests.peers.chatkit_reference import ReferenceServer
from tests.support.service import TEST_API_KEY, TEST_WORKFLOW

_ID = re.compile(rb"\b(thr|msg|tc|call|cksess)_[0-9a-f]+")
_TIMESTAMP = re.compile(rb'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?"')
BETA = {"OpenAI-Beta": "chatkit_beta=v1"}


def normalize(body: bytes) -> bytes:
    """Replace ids (numbered by first appearance) and timestamps, which differ by nature."""
    names: dict[bytes, bytes] = {}

    def rename(match: re.Match[bytes]) -> bytes:
        prefix = match.group(1)
        return names.setdefault(match.group(0), prefix + b"_" + str(len(names)).encode())

    return _TIMESTAMP.sub(b'"TS"', _ID.sub(rename, body))


def user_input(text: str) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": [],
        "quoted_text": "",
        "inference_options": {},
    }


@pytest.fixture
async def reference() -> AsyncIterator[ReferenceServer]:
    server = ReferenceServer()
    await server.start()
    yield server
    await server.stop()


class Peer:
    """Posts ChatKit requests to one server and returns raw bodies."""

    def __init__(self, http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        self.http, self.url, self.headers = http, url, headers
        self.thread_id = ""

    async def post(self, op: str, params: dict[str, Any]) -> bytes:
        body = {"type": op, "params": params, "metadata": {}}
        response = await self.http.post(self.url, json=body, headers=self.headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        if op == "threads.create":
            first = json.loads(response.content.split(b"\n\n")[0][len(b"data: ") :])
            self.thread_id = first["thread"]["id"]
        return response.content


async def emulator_peer(http: httpx.AsyncClient, emulator: ChatKitEmulator, user: str) -> Peer:
    base = f"http://127.0.0.1:{emulator.port}/v1"
    minted = await http.post(
        f"{base}/chatkit/sessions",
        json={"user": user, "workflow": {"id": TEST_WORKFLOW}},
        headers={"Authorization": f"Bearer {TEST_API_KEY}", **BETA},
    )
    secret = minted.json()["client_secret"]
    return Peer(http, f"{base}/chatkit/conversation", {"Authorization": f"Bearer {secret}"})


@pytest.mark.parametrize(
    "text",
    [
        "Hello",
        "hi [notice]",
        "[tool] please",
        "boom [error]",
        "end [fatal]",
        "[chunks=7]",
        'unicode: Héllo 👋 心拍数 "quoted" \\ back\nslash',
    ],
)
async def test_same_bytes_as_the_official_chatkit_server(
    text: str, emulator: ChatKitEmulator, reference: ReferenceServer
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        emulated = await emulator_peer(http, emulator, "user-1")
        official = Peer(http, reference.url, {FORWARDED_USER_HEADER: "user-1"})
        for peer_pair_op in ("threads.create", "threads.add_user_message", "tool_output"):
            bodies = []
            for peer in (emulated, official):
                if peer_pair_op == "threads.create":
                    bodies.append(await peer.post("threads.create", {"input": user_input(text)}))
                elif peer_pair_op == "threads.add_user_message":
                    if "[tool]" in text:  # the thread waits for the tool's answer instead
                        bodies.append(
                            await peer.post(
                                "threads.add_client_tool_output",
                                {"thread_id": peer.thread_id, "result": {"steps": 8042}},
                            )
                        )
                    else:
                        bodies.append(
                            await peer.post(
                                "threads.add_user_message",
                                {"thread_id": peer.thread_id, "input": user_input(text + " again")},
                            )
                        )
            if bodies:
                assert normalize(bodies[0]) == normalize(bodies[1]), peer_pair_op
                assert bodies[0].count(b"data: ") >= 5


async def test_emulator_session_parses_with_the_official_openai_sdk(
    emulator: ChatKitEmulator,
) -> None:
    client = openai.AsyncOpenAI(
        api_key=TEST_API_KEY, base_url=f"http://127.0.0.1:{emulator.port}/v1", max_retries=0
    )
    session = await client.beta.chatkit.sessions.create(
        user="user-7",
        workflow={"id": TEST_WORKFLOW, "state_variables": {"plan": "pro"}},
        expires_after={"anchor": "created_at", "seconds": 120},
    )
    assert session.id.startswith("cksess_")
    assert session.object == "chatkit.session" and session.status == "active"
    assert session.user == "user-7" and session.workflow.id == TEST_WORKFLOW
    assert session.workflow.state_variables == {"plan": "pro"}
    assert session.client_secret and isinstance(session.expires_at, int)
    assert session.rate_limits.max_requests_per_1_minute == 10
    assert session.chatkit_configuration.history.enabled is True
    cancelled = await client.beta.chatkit.sessions.cancel(session.id)
    assert cancelled.status == "cancelled" and cancelled.client_secret == ""
    await client.close()


async def test_emulator_errors_parse_with_the_official_openai_sdk(
    emulator: ChatKitEmulator,
) -> None:
    base_url = f"http://127.0.0.1:{emulator.port}/v1"
    bad = openai.AsyncOpenAI(api_key="sk-wrong", base_url=base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        await bad.beta.chatkit.sessions.create(user="u", workflow={"id": TEST_WORKFLOW})
    assert auth.value.code == "invalid_api_key"
    good = openai.AsyncOpenAI(api_key=TEST_API_KEY, base_url=base_url, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        await good.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_nope"})
    assert "wf_nope" in missing.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        await good.beta.chatkit.sessions.create(
            user="u", workflow={"id": TEST_WORKFLOW}, extra_body={"device": "x"}
        )
    assert unknown.value.code == "unknown_parameter" and unknown.value.param == "device"
    with pytest.raises(openai.BadRequestError) as ttl:
        await good.beta.chatkit.sessions.create(
            user="u",
            workflow={"id": TEST_WORKFLOW},
            expires_after={"anchor": "created_at", "seconds": 601},
        )
    assert ttl.value.param == "expires_after.seconds"
    await bad.close()
    await good.close()


async def test_emulator_refuses_what_the_api_refuses(emulator: ChatKitEmulator) -> None:
    base = f"http://127.0.0.1:{emulator.port}/v1"
    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    async with httpx.AsyncClient() as http:
        no_beta = await http.post(
            f"{base}/chatkit/sessions",
            headers=auth,
            json={"user": "u", "workflow": {"id": TEST_WORKFLOW}},
        )
        assert no_beta.status_code == 400
        assert no_beta.json()["error"]["code"] == "invalid_beta"
        no_user = await http.post(
            f"{base}/chatkit/sessions",
            headers={**auth, **BETA},
            json={"workflow": {"id": TEST_WORKFLOW}},
        )
        assert no_user.status_code == 400
        assert no_user.json()["error"] == {
            "message": "Missing required parameter: 'user'.",
            "type": "invalid_request_error",
            "param": "user",
            "code": "missing_required_parameter",
        }
        nested = await http.post(
            f"{base}/chatkit/sessions",
            headers={**auth, **BETA},
            json={"user": "u", "workflow": {"id": TEST_WORKFLOW, "x": 1}},
        )
        assert nested.json()["error"]["param"] == "workflow.x"
        bad_secret = await http.post(
            f"{base}/chatkit/conversation",
            headers={"Authorization": "Bearer nope"},
            json={"type": "threads.create", "params": {"input": user_input("hi")}},
        )
        assert bad_secret.status_code == 401
