"""MintSession and Chat end to end over real sockets: gRPC client -> service -> emulator."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from healthagent.client import AsyncHealthAgentClient, HealthAgentClient
from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.script import TOOL_ARGUMENTS, TOOL_NAME, parse_stamp
from tests.support.calls import collect, event_kinds
from tests.support.service import TEST_WORKFLOW, Service, ServiceFactory, emulator_env


def assistant_text(events: list[pb.ChatResponse]) -> str:
    return "".join(e.chunk.text for e in events if e.WhichOneof("event") == "chunk")


async def test_chat_streams_a_complete_turn(service: Service) -> None:
    call = service.stub.Chat(
        pb.ChatRequest(message="How did I sleep?", user="user-1", device_id="pixel-8")
    )
    events = await collect(call)
    kinds = event_kinds(events)
    assert kinds[0] == "session" and kinds[-1] == "response_done"
    session = events[0].session
    assert session.conversation_id.startswith("thr_") and session.session_id.startswith("cksess_")
    assert session.user == "user-1" and session.workflow_id == TEST_WORKFLOW
    assert "progress" in kinds and kinds.count("chunk") > 5
    expected = "You said: How did I sleep?. This reply comes from the HealthAgent emulator."
    assert assistant_text(events) == expected
    text_done = next(e.text_done for e in events if e.WhichOneof("event") == "text_done")
    assert text_done.text == expected
    assert {e.chunk.item_id for e in events if e.WhichOneof("event") == "chunk"} == {
        text_done.item_id
    }
    assert events[-1].response_done.text == expected
    assert not events[-1].response_done.awaiting_tool_output
    # protocol bookkeeping is passed through as JSON, not dropped
    passthrough = [e.passthrough for e in events if e.WhichOneof("event") == "passthrough"]
    assert {p.type for p in passthrough} == {"thread.item.done", "stream_options"}
    assert all(json.loads(p.json)["type"] == p.type for p in passthrough)
    assert await call.code() == grpc.StatusCode.OK


async def test_conversation_continues_and_request_id_is_echoed(service: Service) -> None:
    first = await collect(service.stub.Chat(pb.ChatRequest(message="one", user="u2")))
    conversation = first[0].session.conversation_id
    call = service.stub.Chat(
        pb.ChatRequest(message="two", user="u2", conversation_id=conversation),
        metadata=(("x-request-id", "req-42"),),
    )
    second = await collect(call)
    assert second[0].session.conversation_id == conversation
    assert assistant_text(second).startswith("You said: two.")
    assert ("x-request-id", "req-42") in tuple(await call.initial_metadata())


async def test_unary_calls_and_errors_echo_the_request_id_in_trailers(service: Service) -> None:
    mint = service.stub.MintSession(
        pb.MintSessionRequest(user="u-rid"), metadata=(("x-request-id", "req-43"),)
    )
    assert (await mint).user == "u-rid"
    assert ("x-request-id", "req-43") in tuple(await mint.trailing_metadata())
    # a new id when the caller sent none (or one that is not sane)
    unnamed = service.stub.MintSession(
        pb.MintSessionRequest(user="u-rid"), metadata=(("x-request-id", "bad id!"),)
    )
    await unnamed
    generated = dict(await unnamed.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and generated != "bad id!"
    again = service.stub.MintSession(pb.MintSessionRequest(user="u-rid"))
    await again
    another = dict(await again.trailing_metadata())["x-request-id"]
    assert len(another) == 32 and another != generated  # every call gets its own
    # a failure keeps its google.rpc details and the id, for unary calls and for Chat
    with pytest.raises(grpc.aio.AioRpcError) as mint_failure:
        await service.stub.MintSession(
            pb.MintSessionRequest(user=""), metadata=(("x-request-id", "req-44"),)
        )
    with pytest.raises(grpc.aio.AioRpcError) as chat_failure:
        await collect(
            service.stub.Chat(
                pb.ChatRequest(message="", user="u-rid"), metadata=(("x-request-id", "req-45"),)
            )
        )
    for failure, request_id in ((mint_failure.value, "req-44"), (chat_failure.value, "req-45")):
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(failure.trailing_metadata() or ())["x-request-id"] == request_id
        details = rpc_status.from_call(failure)  # type: ignore[arg-type]
        assert details is not None and details.details


async def test_client_tool_call_round_trip(service: Service) -> None:
    events = await collect(service.stub.Chat(pb.ChatRequest(message="steps? [tool]", user="u3")))
    tool_calls = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
    assert len(tool_calls) == 1
    call = tool_calls[0]
    assert call.name == TOOL_NAME and json.loads(call.arguments_json) == TOOL_ARGUMENTS
    assert events[-1].response_done.awaiting_tool_output
    answer = await collect(
        service.stub.Chat(
            pb.ChatRequest(
                user="u3",
                conversation_id=events[0].session.conversation_id,
                tool_output=pb.ToolOutput(call_id=call.call_id, output_json='{"steps": 8042}'),
            )
        )
    )
    assert event_kinds(answer)[0] == "session"
    assert answer[-1].response_done.text == 'Thanks. The tool returned {"steps": 8042}.'


async def test_notice_event(service: Service) -> None:
    events = await collect(service.stub.Chat(pb.ChatRequest(message="hi [notice]", user="u4")))
    notice = next(e.notice for e in events if e.WhichOneof("event") == "notice")
    assert notice.level == pb.NOTICE_LEVEL_WARNING and notice.title == "Emulator notice"


async def test_mint_session_shares_the_pooled_session(
    service: Service, emulator: ChatKitEmulator
) -> None:
    before = time.time()
    minted = await service.stub.MintSession(pb.MintSessionRequest(user="u5", device_id="d"))
    assert minted.client_secret.startswith("ek_")
    assert minted.session.id.startswith("cksess_")
    assert minted.workflow_id == TEST_WORKFLOW and minted.user == "u5"
    assert minted.kind == pb.SESSION_KIND_CHATKIT
    # expires_at is the upstream's (600 s by default); ttl_seconds counts down from it
    expires = minted.session.expires_at.seconds
    assert before + 598 <= expires <= time.time() + 600
    assert 590 <= minted.session.ttl_seconds <= 600
    again = await service.stub.MintSession(pb.MintSessionRequest(user="u5"))
    assert again.session.id == minted.session.id
    events = await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="u5")))
    assert events[0].session.session_id == minted.session.id
    assert emulator.stats.sessions_minted == 1


async def test_mint_session_options_are_sent_upstream(service: Service) -> None:
    request = pb.MintSessionRequest(user="u6", version="3", ttl_seconds=120)
    request.state_variables["plan"].string_value = "pro"
    request.state_variables["age"].number_value = 42
    request.state_variables["beta"].bool_value = True
    minted = await service.stub.MintSession(request)
    assert 110 <= minted.session.ttl_seconds <= 120
    default = await service.stub.MintSession(pb.MintSessionRequest(user="u6"))
    assert default.session.id != minted.session.id  # different options, different session


async def test_concurrent_chats_for_one_user_mint_once(
    service: Service, emulator: ChatKitEmulator
) -> None:
    calls = [
        collect(service.stub.Chat(pb.ChatRequest(message=f"m{i}", user="same-user")))
        for i in range(20)
    ]
    results = await asyncio.gather(*calls)
    assert all(event_kinds(r)[-1] == "response_done" for r in results)
    assert emulator.stats.sessions_minted == 1
    assert len({r[0].session.session_id for r in results}) == 1


async def test_rejected_pooled_secret_is_reminted_once(
    service: Service, emulator: ChatKitEmulator
) -> None:
    first = await collect(service.stub.Chat(pb.ChatRequest(message="a", user="u7")))
    old_session = first[0].session.session_id
    # Cancel the pooled session upstream, with the official cancel endpoint: its secret dies.
    import httpx

    from tests.support.service import TEST_API_KEY

    async with httpx.AsyncClient() as http:
        cancelled = await http.post(
            f"http://127.0.0.1:{emulator.port}/v1/chatkit/sessions/{old_session}/cancel",
            headers={"Authorization": f"Bearer {TEST_API_KEY}", "OpenAI-Beta": "chatkit_beta=v1"},
        )
        assert cancelled.status_code == 200
    requests_before = emulator.stats.conversation_requests
    second = await collect(service.stub.Chat(pb.ChatRequest(message="b", user="u7")))
    assert second[0].session.session_id != old_session
    assert event_kinds(second)[-1] == "response_done"
    assert emulator.stats.sessions_minted == 2
    assert emulator.stats.conversation_requests == requests_before + 2  # the 401, then the retry


async def test_health_and_reflection(service: Service) -> None:
    health: Any = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", "healthagent.v1.HealthAgent"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    await service.running.health.enter_graceful_shutdown()
    answer = await health.Check(health_pb2.HealthCheckRequest(service="healthagent.v1.HealthAgent"))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_python_clients(service: Service) -> None:
    async with AsyncHealthAgentClient(service.target) as client:
        minted = await client.mint_session("u8", device_id="d1")
        assert minted.client_secret
        text = ""
        async for event in client.chat("hello", user="u8"):
            if event.WhichOneof("event") == "chunk":
                text += event.chunk.text
        assert text.startswith("You said: hello.")

    def sync_round_trip() -> list[str]:
        with HealthAgentClient(service.target) as client:
            assert client.mint_session("u8").session.id == minted.session.id
            return [str(e.WhichOneof("event")) for e in client.chat("hi", user="u8")]

    kinds = await asyncio.to_thread(sync_round_trip)
    assert kinds[0] == "session" and kinds[-1] == "response_done"


def connections_to(port: int) -> int:
    """Established TCP connections to `port` on this host, client ends (/proc/net/tcp{,6})."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rpartition(":")[2], 16) == port:
                count += 1
    return count


async def test_python_client_channel_options_spread_calls(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    """docs/deploy.md, "Balancing gRPC": what the Python client needs for client-side balancing
    (round_robin over every address the name resolves to) and for several connections to one
    L4 address (channels share one connection unless their arguments differ)."""
    first = await start_service(**emulator_env(emulator))
    second = await start_service(**emulator_env(emulator))
    ports = (first.running.port, second.running.port)
    # what DNS answers for the headless Service: every ready pod
    both = f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"

    async def chat_four_times(client: AsyncHealthAgentClient) -> None:
        for turn in range(4):
            kinds = [e.WhichOneof("event") async for e in client.chat(f"t{turn}", user="lb")]
            assert kinds[-1] == "response_done"

    async def spread(**options: Any) -> list[int]:
        async with AsyncHealthAgentClient(both, **options) as client:
            await chat_four_times(client)
            return [connections_to(port) for port in ports]

    # gRPC's default (pick_first): one connection, one pod takes every call
    assert sorted(await spread()) == [0, 1]
    assert await spread(channel_options=[("grpc.lb_policy_name", "round_robin")]) == [1, 1]

    async def connections_of_two_clients(**options: Any) -> int:
        async with (
            AsyncHealthAgentClient(first.target, **options) as one,
            AsyncHealthAgentClient(first.target, **options) as other,
        ):
            await asyncio.gather(chat_four_times(one), chat_four_times(other))
            return connections_to(ports[0])

    assert await connections_of_two_clients() == 1  # the process-wide subchannel pool
    local_pool = [("grpc.use_local_subchannel_pool", 1)]
    assert await connections_of_two_clients(channel_options=local_pool) == 2


@pytest.mark.parametrize("unicode_text", ["Héllo 👋 心拍数"])
async def test_embedded_emulator_default(start_service: ServiceFactory, unicode_text: str) -> None:
    service = await start_service(HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS=0)
    assert service.running.emulator is not None
    assert "simulated" in service.running.upstream_description
    events = await collect(service.stub.Chat(pb.ChatRequest(message=unicode_text, user="u")))
    assert unicode_text in assistant_text(events)
    assert events[0].session.workflow_id == "wf_emulator"


async def test_mint_request_is_exactly_the_documented_one(
    service: Service, emulator: ChatKitEmulator
) -> None:
    request = pb.MintSessionRequest(user="u9", device_id="phone", version="3", ttl_seconds=300)
    request.state_variables["plan"].string_value = "pro"
    request.state_variables["age"].number_value = 42
    request.state_variables["ratio"].number_value = 0.5
    request.state_variables["beta"].bool_value = False
    await service.stub.MintSession(request)
    assert emulator.session_requests[-1] == {
        "user": "u9",
        "workflow": {
            "id": TEST_WORKFLOW,
            "version": "3",
            "state_variables": {"age": 42, "beta": False, "plan": "pro", "ratio": 0.5},
        },
        "expires_after": {"anchor": "created_at", "seconds": 300},
    }
    assert isinstance(emulator.session_requests[-1]["workflow"]["state_variables"]["age"], int)
    await service.stub.MintSession(pb.MintSessionRequest(user="u10"))
    assert emulator.session_requests[-1] == {"user": "u10", "workflow": {"id": TEST_WORKFLOW}}


async def test_benchmark_triggers_pace_and_stamp_the_chunks(service: Service) -> None:
    """`[pace=N]` spaces the chunks N ms apart and `[stamp]` makes each chunk's text the
    emulator's send time; the benchmark harness measures the hop's latency with them."""
    before = time.monotonic_ns()
    events = [
        e
        async for e in service.stub.Chat(
            pb.ChatRequest(message="[chunks=4] [pace=30] [stamp]", user="bench")
        )
    ]
    after = time.monotonic_ns()
    chunks = [e.chunk.text for e in events if e.WhichOneof("event") == "chunk"]
    sent = [parse_stamp(text) for text in chunks]
    assert len(sent) == 4 and all(len(text) == 20 for text in chunks)
    assert before < sent[0] and sent[-1] < after
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert min(gaps) >= 25_000_000  # 30 ms apart, give or take the timer's slack
    assert events[-1].response_done.text == "".join(chunks)
