"""Chat and MintSession through the Realtime upstream, over real WebSockets to the emulator."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.config import DEFAULT_REALTIME_INSTRUCTIONS
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.realtime_emulator import (
    RealtimeEmulator,
    RealtimeEmulatorConfig,
)
from healthagent_service.emulator.script import TOOL_ARGUMENTS, TOOL_NAME
from tests.support.calls import collect, event_kinds, status_details, wait_for
from tests.support.service import TEST_API_KEY, Service, ServiceFactory, emulator_env


def realtime_env(emulator: ChatKitEmulator, **overrides: Any) -> dict[str, Any]:
    return emulator_env(emulator, HEALTHAGENT_UPSTREAM="realtime", **overrides)


@pytest.fixture
async def realtime_service(emulator: ChatKitEmulator, start_service: ServiceFactory) -> Service:
    return await start_service(**realtime_env(emulator))


def realtime_of(emulator: ChatKitEmulator) -> RealtimeEmulator:
    assert emulator.realtime is not None
    return emulator.realtime


def text_of(events: list[pb.ChatResponse]) -> str:
    return "".join(e.chunk.text for e in events if e.WhichOneof("event") == "chunk")


def items_text(emulator: ChatKitEmulator, session_id: str) -> list[str]:
    """The texts of the conversation items an upstream session holds, in order."""
    items = realtime_of(emulator).sessions[session_id].items
    return [
        "".join(part.get("text", "") for part in item.get("content") or ())
        for item in items
        if item.get("type") == "message"
    ]


async def test_mint_realtime_secret(realtime_service: Service, emulator: ChatKitEmulator) -> None:
    before = time.time()
    minted = await realtime_service.stub.MintSession(
        pb.MintSessionRequest(user="app-user", kind=pb.SESSION_KIND_REALTIME, ttl_seconds=120)
    )
    assert minted.client_secret.startswith("ek_")
    assert minted.session.id.startswith("sess_")
    assert minted.kind == pb.SESSION_KIND_REALTIME and minted.user == "app-user"
    assert minted.workflow_id == "gpt-realtime"
    assert before + 118 <= minted.session.expires_at.seconds <= time.time() + 120
    assert 110 <= minted.session.ttl_seconds <= 120
    assert realtime_of(emulator).secret_requests[-1] == {
        "expires_after": {"anchor": "created_at", "seconds": 120},
        "session": {
            "type": "realtime",
            "model": "gpt-realtime",
            "instructions": DEFAULT_REALTIME_INSTRUCTIONS,
            "output_modalities": ["text"],
        },
    }
    again = await realtime_service.stub.MintSession(
        pb.MintSessionRequest(user="app-user", kind=pb.SESSION_KIND_REALTIME)
    )
    assert again.client_secret != minted.client_secret  # never shared between callers
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await realtime_service.stub.MintSession(
            pb.MintSessionRequest(user="u", kind=pb.SESSION_KIND_REALTIME, ttl_seconds=5)
        )
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.field_violations[0][0] == "ttl_seconds"


async def test_text_turn(realtime_service: Service, emulator: ChatKitEmulator) -> None:
    events = await collect(
        realtime_service.stub.Chat(pb.ChatRequest(message="How did I sleep?", user="alice"))
    )
    kinds = event_kinds(events)
    assert kinds[0] == "session" and kinds[-1] == "response_done"
    session = events[0].session
    assert session.conversation_id.startswith("rtconv_")
    assert session.session_id in realtime_of(emulator).sessions
    expected = "You said: How did I sleep?. This reply comes from the HealthAgent emulator."
    assert text_of(events) == expected
    assert next(e.text_done.text for e in events if e.WhichOneof("event") == "text_done") == (
        expected
    )
    done = events[-1].response_done
    assert done.text == expected and done.usage.total_tokens > 0
    assert done.usage.output_tokens == kinds.count("chunk")


async def test_function_call_round_trip(realtime_service: Service) -> None:
    stub = realtime_service.stub
    events = await collect(stub.Chat(pb.ChatRequest(message="steps? [tool]", user="bob")))
    call = next(e.tool_call for e in events if e.WhichOneof("event") == "tool_call")
    assert call.name == TOOL_NAME and json.loads(call.arguments_json) == TOOL_ARGUMENTS
    assert events[-1].response_done.awaiting_tool_output
    conversation = events[0].session.conversation_id
    answer = await collect(
        stub.Chat(
            pb.ChatRequest(
                user="bob",
                conversation_id=conversation,
                tool_output=pb.ToolOutput(call_id=call.call_id, output_json='{"steps": 9000}'),
            )
        )
    )
    assert answer[-1].response_done.text == 'Thanks. The tool returned {"steps": 9000}.'
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await collect(
            stub.Chat(
                pb.ChatRequest(
                    user="bob",
                    conversation_id=conversation,
                    tool_output=pb.ToolOutput(call_id=call.call_id, output_json="1"),
                )
            )
        )
    assert status_details(stale.value).field_violations[0][0] == "tool_output.call_id"


async def test_replay_after_a_forced_reconnect(
    realtime_service: Service, emulator: ChatKitEmulator
) -> None:
    stub = realtime_service.stub
    first = await collect(stub.Chat(pb.ChatRequest(message="one", user="carol")))
    conversation = first[0].session.conversation_id
    second = await collect(
        stub.Chat(pb.ChatRequest(message="two", user="carol", conversation_id=conversation))
    )
    assert second[0].session.session_id == first[0].session.session_id  # socket kept
    await realtime_of(emulator).drop_all()
    third = await collect(
        stub.Chat(pb.ChatRequest(message="three", user="carol", conversation_id=conversation))
    )
    assert event_kinds(third)[-1] == "response_done"
    new_session = third[0].session.session_id
    assert new_session != first[0].session.session_id
    assert third[0].session.conversation_id == conversation  # one continuous conversation
    texts = items_text(emulator, new_session)
    assert texts[0] == "one" and texts[2] == "two" and texts[4] == "three"
    assert texts[1].startswith("You said: one.") and texts[3].startswith("You said: two.")


class TestSessionExpiry:
    """Upstream sessions that last one second."""

    @pytest.fixture
    def realtime_config(self) -> RealtimeEmulatorConfig:
        return RealtimeEmulatorConfig(
            api_key=TEST_API_KEY, chunk_delay_seconds=0.001, session_max_seconds=1.0
        )

    async def test_between_and_during_turns(
        self, realtime_service: Service, emulator: ChatKitEmulator
    ) -> None:
        stub = realtime_service.stub
        first = await collect(stub.Chat(pb.ChatRequest(message="before", user="dave")))
        conversation = first[0].session.conversation_id
        await wait_for(lambda: realtime_of(emulator).stats.sessions_expired >= 1)
        # Between turns: the next turn reconnects and replays, and the caller sees no seam.
        after = await collect(
            stub.Chat(pb.ChatRequest(message="after", user="dave", conversation_id=conversation))
        )
        assert event_kinds(after)[-1] == "response_done"
        assert items_text(emulator, after[0].session.session_id)[0] == "before"
        # During a turn: the answer is cut by the expiry, so the turn fails, never OK.
        received: list[pb.ChatResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for event in stub.Chat(
                pb.ChatRequest(message="[chunks=100000]", user="dave", conversation_id=conversation)
            ):
                received.append(event)
        details = status_details(failure.value)
        assert details.code == grpc.StatusCode.UNAVAILABLE
        assert details.reason == "UPSTREAM_SESSION_EXPIRED"
        assert "chunk" in event_kinds(received) and "response_done" not in event_kinds(received)


async def test_rate_limit_and_non_fatal_error(realtime_service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(
            realtime_service.stub.Chat(pb.ChatRequest(message="[ratelimit]", user="erin"))
        )
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "UPSTREAM_RATE_LIMITED"
    assert details.retry_delay_seconds == pytest.approx(6.9)
    events = await collect(
        realtime_service.stub.Chat(pb.ChatRequest(message="[error] hi", user="erin"))
    )
    notice = next(e.notice for e in events if e.WhichOneof("event") == "notice")
    assert notice.level == pb.NOTICE_LEVEL_WARNING and "emulated_error" in notice.title
    assert event_kinds(events)[-1] == "response_done"


async def test_drop_mid_answer_is_unavailable(realtime_service: Service) -> None:
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in realtime_service.stub.Chat(pb.ChatRequest(message="[drop]", user="fay")):
            received.append(event)
    assert status_details(failure.value).reason == "UPSTREAM_STREAM_TRUNCATED"
    assert event_kinds(received).count("chunk") == 2


async def test_logout_mid_answer_aborts_the_turn(realtime_service: Service) -> None:
    """A RevokeSessions during a turn closes its socket; the caller is told ABORTED
    SESSION_REVOKED, not the retryable UNAVAILABLE a dropped socket would give (issue 23, 7)."""
    stub = realtime_service.stub
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in stub.Chat(pb.ChatRequest(message="[chunks=2000] [pace=5]", user="lou")):
            received.append(event)
            if len(received) == 3:
                revoked = await stub.RevokeSessions(pb.RevokeSessionsRequest(user="lou"))
                assert revoked.closed_sockets == 1
    details = status_details(failure.value)
    assert (details.code, details.reason) == (grpc.StatusCode.ABORTED, "SESSION_REVOKED")
    assert details.retry_delay_seconds is None  # not to be retried as it is
    assert "response_done" not in event_kinds(received)


async def test_client_cancel_closes_the_upstream_socket(
    realtime_service: Service, emulator: ChatKitEmulator
) -> None:
    call = realtime_service.stub.Chat(pb.ChatRequest(message="[chunks=100000]", user="gus"))
    async for event in call:
        if event.WhichOneof("event") == "chunk":
            break
    before = realtime_of(emulator).stats.closed_by_client
    call.cancel()
    await wait_for(lambda: realtime_of(emulator).stats.closed_by_client == before + 1)


async def test_auth_failure_after_upgrade_and_at_handshake(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    for reject_at_handshake in (False, True):
        # Secrets come from `emulator`; this other server knows none of them.
        stranger = RealtimeEmulator(
            RealtimeEmulatorConfig(api_key="sk-other", reject_auth_at_handshake=reject_at_handshake)
        )
        await stranger.start()
        try:
            service = await start_service(
                **realtime_env(
                    emulator, OPENAI_REALTIME_URL=f"ws://127.0.0.1:{stranger.port}/v1/realtime"
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="hal")))
            details = status_details(failure.value)
            assert details.code == grpc.StatusCode.FAILED_PRECONDITION
            assert details.reason == "UPSTREAM_API_KEY_REJECTED"
            assert "OPENAI_API_KEY" in details.message
            assert stranger.stats.auth_failures >= 1
        finally:
            await stranger.close()


async def test_bad_key_fails_at_minting(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**realtime_env(emulator, OPENAI_API_KEY="sk-wrong"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="ivy")))
    assert status_details(failure.value).reason == "UPSTREAM_API_KEY_REJECTED"
    assert "sk-wrong" not in (failure.value.details() or "")


async def test_conversations_belong_to_their_user(
    realtime_service: Service, emulator: ChatKitEmulator
) -> None:
    stub = realtime_service.stub
    mine = await collect(stub.Chat(pb.ChatRequest(message="secret plan", user="jan")))
    theirs = await collect(stub.Chat(pb.ChatRequest(message="hello", user="kim")))
    assert theirs[0].session.session_id != mine[0].session.session_id
    assert "secret plan" not in items_text(emulator, theirs[0].session.session_id)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(
            stub.Chat(
                pb.ChatRequest(
                    message="hi", user="kim", conversation_id=mine[0].session.conversation_id
                )
            )
        )
    assert status_details(failure.value).code == grpc.StatusCode.NOT_FOUND


async def test_warm_pool_hands_out_only_live_sockets(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**realtime_env(emulator, HEALTHAGENT_REALTIME_WARM_SOCKETS=2))
    realtime = service.running.realtime
    await wait_for(lambda: realtime.warm_sockets == 2)
    opened = realtime_of(emulator).stats.connections_opened
    events = await collect(service.stub.Chat(pb.ChatRequest(message="warm", user="lee")))
    assert event_kinds(events)[-1] == "response_done"
    assert realtime.stats.warm_hits == 1
    await wait_for(lambda: realtime.warm_sockets == 2)  # refilled
    assert realtime_of(emulator).stats.connections_opened == opened + 1
    # Kill every upstream socket: the pool must not hand a dead one out.
    await realtime_of(emulator).drop_all()
    await wait_for(lambda: all(not s.open_for(3600) for s in realtime.warm_snapshot()))
    events = await collect(service.stub.Chat(pb.ChatRequest(message="after drop", user="max")))
    assert event_kinds(events)[-1] == "response_done"
    assert events[0].session.session_id in realtime_of(emulator).sessions
    socket = realtime.conversation_socket(events[0].session.conversation_id)
    assert socket is not None and socket.open_for(3600)


async def test_idle_conversation_socket_is_closed_then_replayed(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**realtime_env(emulator, HEALTHAGENT_REALTIME_IDLE_SECONDS=0.3))
    first = await collect(service.stub.Chat(pb.ChatRequest(message="first", user="ned")))
    conversation = first[0].session.conversation_id
    await wait_for(lambda: service.running.realtime.conversation_socket(conversation) is None)
    await wait_for(lambda: realtime_of(emulator).stats.connections_open == 0)
    second = await collect(
        service.stub.Chat(
            pb.ChatRequest(message="second", user="ned", conversation_id=conversation)
        )
    )
    assert items_text(emulator, second[0].session.session_id)[:2] == ["first", text_of(first)]


async def test_keepalive_pings_are_answered(start_service: ServiceFactory) -> None:
    pinging = RealtimeEmulator(
        RealtimeEmulatorConfig(
            api_key="sk-ping", ping_interval_seconds=0.1, ping_timeout_seconds=0.5
        )
    )
    await pinging.start()
    try:
        from healthagent_service.emulator.chatkit_emulator import EmulatorConfig

        http = ChatKitEmulator(
            EmulatorConfig(api_key="sk-ping", workflows=frozenset({"wf"})), realtime=pinging
        )
        await http.start()
        service = await start_service(**realtime_env(http, OPENAI_API_KEY="sk-ping"))
        events = await collect(service.stub.Chat(pb.ChatRequest(message="ping me", user="ola")))
        conversation = events[0].session.conversation_id
        await asyncio.sleep(1.5)  # 15 server pings; an unanswered one closes after 0.5 s
        socket = service.running.realtime.conversation_socket(conversation)
        assert socket is not None and socket.open_for(3600)
        assert pinging.stats.connections_open == 1
        await http.close()
    finally:
        await pinging.close()


async def test_handshake_never_sends_the_beta_header(
    realtime_service: Service, emulator: ChatKitEmulator
) -> None:
    await collect(realtime_service.stub.Chat(pb.ChatRequest(message="hi", user="pat")))
    headers = realtime_of(emulator).handshake_headers
    assert headers and all("openai-beta" not in h for h in headers)
    assert all(h["authorization"].startswith("Bearer ek_") for h in headers)


async def test_unreachable_realtime_is_retried_with_backoff_then_unavailable(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    from harness.processes import free_port

    service = await start_service(
        **realtime_env(emulator, OPENAI_REALTIME_URL=f"ws://127.0.0.1:{free_port()}/v1/realtime")
    )
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="quinn")))
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.reason == "UPSTREAM_UNAVAILABLE" and details.retry_delay_seconds
    assert service.running.realtime.stats.connect_failures == 4  # every attempt was made
    assert time.monotonic() - started < 10  # and the backoff is bounded


def test_a_rate_limit_error_before_a_close_is_resource_exhausted() -> None:
    from healthagent_service.upstream import realtime_events as rt

    error = {
        "type": "error",
        "error": {"code": "rate_limit_exceeded", "message": "Please try again in 120ms."},
    }
    status = rt.closed_error(1011, error, mid_turn=True, api_key_setting="OPENAI_API_KEY")
    assert status.reason == "UPSTREAM_RATE_LIMITED"
    assert status.retry_after_seconds == pytest.approx(0.12)
