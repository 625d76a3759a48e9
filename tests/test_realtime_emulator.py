"""The emulator's Realtime side, spoken to directly with a websockets client."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.realtime_emulator import RealtimeEmulatorConfig
from tests.support.service import TEST_API_KEY


def url(emulator: ChatKitEmulator, model: str = "gpt-realtime") -> str:
    assert emulator.realtime is not None
    return f"ws://127.0.0.1:{emulator.realtime.port}/v1/realtime?model={model}"


async def receive(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def events_until(ws: ClientConnection, last: str) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await receive(ws)
        events.append(event)
        if event["type"] == last:
            return events


async def test_text_turn_event_order(emulator: ChatKitEmulator) -> None:
    async with connect(
        url(emulator), additional_headers={"Authorization": f"Bearer {TEST_API_KEY}"}
    ) as ws:
        created = await receive(ws)
        assert created["type"] == "session.created"
        assert created["session"]["id"].startswith("sess_")
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "output_modalities": ["text"]},
                }
            )
        )
        assert (await receive(ws))["type"] == "session.updated"
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hi"}],
                    },
                }
            )
        )
        await ws.send(json.dumps({"type": "response.create"}))
        events = await events_until(ws, "response.done")
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["conversation.item.added", "conversation.item.done"]
        assert kinds.index("response.created") < kinds.index("response.output_item.added")
        assert kinds.index("response.output_text.done") < kinds.index("response.done")
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert deltas and all(
            e["obfuscation"] and e["event_id"].startswith("event_") for e in deltas
        )
        done = events[-1]["response"]
        assert done["status"] == "completed" and done["usage"]["total_tokens"] > 0
        assert "".join(e["delta"] for e in deltas) == done["output"][0]["content"][0]["text"]
        # the first response announces rate limits before response.created, the next after
        assert "rate_limits.updated" in kinds


async def test_bad_key_closes_3000_after_the_upgrade(emulator: ChatKitEmulator) -> None:
    async with connect(url(emulator), additional_headers={"Authorization": "Bearer nope"}) as ws:
        error = await receive(ws)
        assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3000


class TestShortSessions:
    """Upstream sessions that last half a second."""

    @pytest.fixture
    def realtime_config(self) -> RealtimeEmulatorConfig:
        return RealtimeEmulatorConfig(
            api_key=TEST_API_KEY, chunk_delay_seconds=0.001, session_max_seconds=0.5
        )

    async def test_beta_header_closes_4000_and_sessions_expire_with_1001(
        self, emulator: ChatKitEmulator
    ) -> None:
        async with connect(
            url(emulator),
            additional_headers={
                "Authorization": f"Bearer {TEST_API_KEY}",
                "OpenAI-Beta": "realtime=v1",
            },
        ) as ws:
            assert (await receive(ws))["error"]["code"] == "invalid_beta"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
        async with connect(
            url(emulator), additional_headers={"Authorization": f"Bearer {TEST_API_KEY}"}
        ) as ws:
            assert (await receive(ws))["type"] == "session.created"
            expired = await receive(ws)
            assert expired["type"] == "error" and expired["error"]["code"] == "session_expired"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_ephemeral_secrets(emulator: ChatKitEmulator) -> None:
    async with httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{emulator.port}/v1/realtime/client_secrets"
        minted = await http.post(
            base,
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
            json={
                "expires_after": {"anchor": "created_at", "seconds": 60},
                "session": {"type": "realtime", "model": "gpt-realtime"},
            },
        )
        assert minted.status_code == 200
        answer = minted.json()
        assert answer["value"].startswith("ek_") and answer["session"]["id"].startswith("sess_")
        too_long = await http.post(
            base,
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
            json={"expires_after": {"seconds": 7201}},
        )
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "expires_after.seconds"
    async with connect(
        url(emulator), additional_headers={"Authorization": f"Bearer {answer['value']}"}
    ) as ws:
        assert (await receive(ws))["type"] == "session.created"


async def test_handshake_rejection_when_configured(emulator: ChatKitEmulator) -> None:
    from healthagent_service.emulator.realtime_emulator import RealtimeEmulator

    strict = RealtimeEmulator(RealtimeEmulatorConfig(api_key="k", reject_auth_at_handshake=True))
    await strict.start()
    try:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"ws://127.0.0.1:{strict.port}/v1/realtime?model=m",
                additional_headers={"Authorization": "Bearer wrong"},
            ):
                pass
        assert refused.value.response.status_code == 401
    finally:
        await strict.close()
