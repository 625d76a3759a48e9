"""The agent server for real: the official ChatKit server running the real Agents SDK, whose model
is the emulator's Responses (or Chat Completions) API, behind the service, over loopback."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import httpx
import jwt
import pytest
from chatkit.types import AssistantMessageItem

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.agent.health_agent import REFERENCE_RANGES
from healthagent_service.agent.loading import AgentLoadError
from healthagent_service.agent.thread_store import RequestContext
from healthagent_service.config import DEFAULT_AGENT_TOKEN_AUDIENCE
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.script import TOOL_ARGUMENTS, TOOL_NAME
from healthagent_service.security.agent_tokens import issue_agent_token
from tests.peers.custom_agents import CUSTOM_INSTRUCTIONS, REFUSED_WORD, WITHDRAWN_WORD
from tests.support.agents import (
    SERVICE_AUTH,
    TOKEN_SECRET,
    AgentFactory,
    agent_service,
    chat,
    chatkit_request,
    post_chatkit,
    service_env,
    user_input,
    user_messages,
)
from tests.support.calls import collect, event_kinds, status_details
from tests.support.service import ServiceFactory


def _done(events: list[pb.ChatResponse]) -> pb.ResponseDone:
    assert events[-1].WhichOneof("event") == "response_done", event_kinds(events)
    return events[-1].response_done


async def test_a_text_turn_streams_the_agents_answer_with_usage(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(start_agent, start_service)
    events = await collect(chat(service, "How did I sleep last night?"))
    kinds = event_kinds(events)
    assert kinds[0] == "session" and events[0].session.conversation_id.startswith("thr_")
    assert kinds.count("chunk") > 3 and "text_done" in kinds
    done = _done(events)
    assert done.text == "You said: How did I sleep last night?. This reply comes from the " + (
        "HealthAgent emulator."
    )
    assert "".join(e.chunk.text for e in events if e.WhichOneof("event") == "chunk") == done.text
    # the model's usage, reported by the agent server's usage effect
    record = emulator.model_requests[-1]
    assert done.usage.input_tokens == record.input_tokens > 0
    assert done.usage.output_tokens == record.output_tokens > 0
    assert done.usage.total_tokens == record.input_tokens + record.output_tokens
    # the built-in agent: its instructions and its three tools went to the model
    assert record.input[0][0] == "system" and "not a doctor" in record.input[0][1]
    assert set(record.tools) == {TOOL_NAME, "lookup_reference_range", "calculate_bmi"}
    assert record.api == "responses" and record.stream
    conversation = await service.stub.GetConversation(
        pb.GetConversationRequest(user="alice", conversation_id=events[0].session.conversation_id)
    )
    assert [m.text for m in conversation.conversation.messages][-1] == done.text


async def test_a_server_tool_runs_inside_the_turn(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(start_agent, start_service)
    events = await collect(
        chat(service, 'Is my sleep normal? [call lookup_reference_range {"metric": "sleep"}]')
    )
    # the tool ran here: the caller sees no tool call, only the answer built on its result
    assert "tool_call" not in event_kinds(events)
    assert "\n\nThanks. The tool returned {" in _done(events).text
    first, second = list(emulator.model_requests)[-2:]
    assert ("tool_call", 'lookup_reference_range {"metric":"sleep"}') in second.input
    tool_results = [text for role, text in second.input if role == "tool"]
    assert json.loads(tool_results[0]) == {"metric": "sleep", **REFERENCE_RANGES["sleep"]}
    assert first.input[-1] == ("user", user_messages(second)[-1])


async def test_the_client_tool_ends_the_turn_and_its_output_resumes_it(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(start_agent, start_service)
    events = await collect(chat(service, "How active was I this week? [tool]"))
    calls = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
    assert len(calls) == 1 and calls[0].name == TOOL_NAME
    assert json.loads(calls[0].arguments_json) == TOOL_ARGUMENTS
    assert _done(events).awaiting_tool_output
    requests_before = len(emulator.model_requests)
    conversation_id = events[0].session.conversation_id
    output = pb.ToolOutput(call_id=calls[0].call_id, output_json='{"steps": [8000, 9500]}')
    resumed = await collect(chat(service, conversation_id=conversation_id, tool_output=output))
    assert _done(resumed).text == 'Thanks. The tool returned {"steps": [8000, 9500]}.'
    assert not _done(resumed).awaiting_tool_output
    # one model request: the stored call and its output went to the model
    assert len(emulator.model_requests) == requests_before + 1
    record = emulator.model_requests[-1]
    assert record.input[-2] == ("tool_call", f"{TOOL_NAME} {json.dumps(TOOL_ARGUMENTS)}")
    assert record.input[-1][0] == "tool" and json.loads(record.input[-1][1]) == {
        "steps": [8000, 9500]
    }


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_later_turns_carry_the_earlier_ones(
    api: str,
    emulator: ChatKitEmulator,
    start_agent: AgentFactory,
    start_service: ServiceFactory,
) -> None:
    agent, service = await agent_service(start_agent, start_service, HEALTHAGENT_AGENT_API=api)
    conversation_id: str | None = None
    answers: list[pb.ResponseDone] = []
    item_ids: list[str] = []
    for text in ("first question", "second question", "third question", "fourth question"):
        events = await collect(chat(service, text, conversation_id=conversation_id))
        conversation_id = events[0].session.conversation_id
        answers.append(_done(events))
        item_ids += [e.text_done.item_id for e in events if e.WhichOneof("event") == "text_done"]
    record = emulator.model_requests[-1]
    assert record.api == api.replace("_", ".")
    assert answers[-1].usage.input_tokens == record.input_tokens > 0
    conversation = [(role, text) for role, text in record.input if role != "system"]
    assert conversation == [
        ("user", "first question"),
        ("assistant", answers[0].text),
        ("user", "second question"),
        ("assistant", answers[1].text),
        ("user", "third question"),
        ("assistant", answers[2].text),
        ("user", "fourth question"),
    ]
    # every answer its own item, stored under its own id (chatkit-python#36 gives them all
    # "__fake_id__" with chat completions, so each overwrote the last)
    assert len(set(item_ids)) == 4 and "__fake_id__" not in item_ids
    assert conversation_id is not None
    page = await agent.app.chatkit.store.load_thread_items(
        conversation_id, None, 50, "asc", RequestContext("alice", "service")
    )
    stored = [item.id for item in page.data if isinstance(item, AssistantMessageItem)]
    assert stored == item_ids


async def test_a_model_that_repeats_its_message_ids_overwrites_no_answer(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    # `[sameids]`: the emulator's Responses API names every answer's message `msg_0`, as some
    # Responses-compatible servers do; the store upserts by item id
    agent, service = await agent_service(start_agent, start_service)
    conversation_id: str | None = None
    turns = [
        "first question [sameids]",
        "second question [sameids]",
        "third question [sameids]",
        # two messages in one turn, both `msg_0`: the preamble, then the answer to the tool
        'is my sleep normal? [sameids] [call lookup_reference_range {"metric": "sleep"}]',
        "fifth question [sameids]",
    ]
    texts: list[str] = []
    item_ids: list[str] = []
    inputs: list[list[tuple[str, str]]] = []
    for text in turns:
        events = await collect(chat(service, text, conversation_id=conversation_id))
        conversation_id = events[0].session.conversation_id
        done = [e.text_done for e in events if e.WhichOneof("event") == "text_done"]
        texts += [d.text for d in done]
        item_ids += [d.item_id for d in done]
        inputs.append([pair for pair in emulator.model_requests[-1].input if pair[0] != "system"])
    assert len(texts) == 6 and texts[3] == "Let me look that up."
    assert texts[4].startswith("Thanks. The tool returned {")
    # the model's own id while it is unique, a fresh one for every repeat
    assert item_ids[0] == "msg_0" and len(set(item_ids)) == 6
    # every answer is still in the thread, over the agent server's ChatKit API
    alice = {SERVICE_AUTH[0]: SERVICE_AUTH[1], "X-HealthAgent-User": "alice"}
    status, body = await post_chatkit(
        agent,
        chatkit_request("items.list", thread_id=conversation_id, limit=50, order="asc"),
        alice,
    )
    assert status == 200
    stored = [item for item in body[0]["data"] if item["type"] == "assistant_message"]
    assert [item["id"] for item in stored] == item_ids
    assert ["".join(part["text"] for part in item["content"]) for item in stored] == texts
    # and the model received every earlier turn
    assert inputs[2] == [
        ("user", turns[0]),
        ("assistant", texts[0]),
        ("user", turns[1]),
        ("assistant", texts[1]),
        ("user", turns[2]),
    ]
    assert inputs[4] == [
        *inputs[2],
        ("assistant", texts[2]),
        ("user", turns[3]),
        ("assistant", texts[3]),
        ("assistant", texts[4]),
        ("user", turns[4]),
    ]


async def test_a_custom_agent_module_runs_instead_of_the_built_in_one(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(
        start_agent,
        start_service,
        HEALTHAGENT_AGENT="tests.peers.custom_agents:sleep_coach",
        HEALTHAGENT_AGENT_MODEL="gpt-test-model",
    )
    assert _done(await collect(chat(service, "hello coach"))).text.startswith("You said")
    record = emulator.model_requests[-1]
    assert record.input[0] == ("system", CUSTOM_INSTRUCTIONS)
    assert record.tools == [] and record.model == "gpt-test-model"


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("tests.peers.custom_agents", "must look like 'package.module:attribute'"),
        ("tests.peers.no_such_module:agent", "cannot import"),
        ("tests.peers.custom_agents:missing", "has no attribute 'missing'"),
        ("tests.peers.custom_agents:not_an_agent", "is a int, not an agents.Agent"),
    ],
)
async def test_an_agent_setting_that_names_no_agent_is_refused(
    spec: str, complaint: str, start_agent: AgentFactory
) -> None:
    with pytest.raises(AgentLoadError, match="HEALTHAGENT_AGENT") as raised:
        await start_agent(HEALTHAGENT_AGENT=spec)
    assert complaint in str(raised.value)


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_an_output_guardrail_withdraws_text_the_caller_already_has(
    api: str,
    emulator: ChatKitEmulator,
    start_agent: AgentFactory,
    start_service: ServiceFactory,
) -> None:
    agent, service = await agent_service(
        start_agent,
        start_service,
        HEALTHAGENT_AGENT="tests.peers.custom_agents:guarded_agent",
        HEALTHAGENT_AGENT_API=api,
    )
    call = chat(service, f"say something {WITHDRAWN_WORD}")
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for event in call:
            received.append(event)
    details = status_details(failed.value)
    assert details.code is grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "OUTPUT_WITHDRAWN"
    assert details.retry_delay_seconds is None
    # the caller had the text, and is told exactly which message to take back
    chunk_items = {e.chunk.item_id for e in received if e.WhichOneof("event") == "chunk"}
    assert chunk_items and WITHDRAWN_WORD in "".join(
        e.chunk.text for e in received if e.WhichOneof("event") == "chunk"
    )
    assert set(details.metadata["withdrawn_item_ids"].split(",")) == chunk_items
    assert details.metadata["guardrail"] == "no_forbidden_words"
    assert "response_done" not in event_kinds(received)
    # neither the service's history nor the agent's thread keeps the withdrawn text
    conversation_id = received[0].session.conversation_id
    history = await service.stub.GetConversation(
        pb.GetConversationRequest(user="alice", conversation_id=conversation_id)
    )
    assistant = [m for m in history.conversation.messages if m.role == pb.MESSAGE_ROLE_ASSISTANT]
    assert [m.text for m in assistant] == [""]
    assert assistant[0].error_reason == "OUTPUT_WITHDRAWN"
    page = await agent.app.chatkit.store.load_thread_items(
        conversation_id, None, 50, "asc", RequestContext("alice", "service")
    )
    assert not [item for item in page.data if isinstance(item, AssistantMessageItem)]


async def test_an_input_guardrail_refuses_the_message(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(
        start_agent, start_service, HEALTHAGENT_AGENT="tests.peers.custom_agents:guarded_agent"
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(chat(service, f"please {REFUSED_WORD} now"))
    details = status_details(failed.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INPUT_REFUSED"
    assert details.metadata["guardrail"] == "refuse_marked_messages"
    # the refused message leaves the thread: the model never reads it again
    conversation_id = await _last_conversation(service)
    await collect(chat(service, "a fine question", conversation_id=conversation_id))
    assert user_messages(emulator.model_requests[-1]) == ["a fine question"]


@pytest.mark.parametrize(
    "failure",
    [
        ("[ratelimit]", grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_RATE_LIMITED", 2.0),
        ("[http 500]", grpc.StatusCode.UNAVAILABLE, "MODEL_ERROR", 1.0),
        ("[http 503]", grpc.StatusCode.UNAVAILABLE, "MODEL_ERROR", 1.0),
        ("[drop]", grpc.StatusCode.UNAVAILABLE, "MODEL_UNAVAILABLE", 1.0),
        ("[error]", grpc.StatusCode.UNAVAILABLE, "MODEL_STREAM_FAILED", 1.0),
        ("[noend]", grpc.StatusCode.UNAVAILABLE, "MODEL_STREAM_FAILED", 1.0),
        ("[length]", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_ANSWER_INCOMPLETE", None),
        ("[http 401]", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_AUTH_REJECTED", None),
        ("[http 404]", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_REJECTED_REQUEST", None),
    ],
)
@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_model_failures_end_the_stream_with_a_status_never_ok(
    api: str,
    failure: tuple[str, grpc.StatusCode, str, float | None],
    start_agent: AgentFactory,
    start_service: ServiceFactory,
) -> None:
    trigger, code, reason, retry = failure
    _, service = await agent_service(start_agent, start_service, HEALTHAGENT_AGENT_API=api)
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for event in chat(service, f"tell me about my heart {trigger}"):
            received.append(event)
    details = status_details(failed.value)
    assert (details.code, details.reason) == (code, reason), details.message
    assert details.retry_delay_seconds == retry
    assert "response_done" not in event_kinds(received)


@pytest.mark.parametrize(
    ("api", "stop"), [("responses", "max_output_tokens"), ("chat_completions", "length")]
)
async def test_an_answer_cut_at_the_token_limit_ends_incomplete_and_is_kept(
    api: str, stop: str, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(start_agent, start_service, HEALTHAGENT_AGENT_API=api)
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for event in chat(service, "how far did I walk? [length]"):
            received.append(event)
    details = status_details(failed.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_ANSWER_INCOMPLETE",
    )
    assert details.retry_delay_seconds is None and details.metadata["model_stop"] == stop
    text = "".join(e.chunk.text for e in received if e.WhichOneof("event") == "chunk")
    assert text == "You said: "
    # kept as what it is: an incomplete answer, not a withdrawn one
    history = await service.stub.GetConversation(
        pb.GetConversationRequest(user="alice", conversation_id=received[0].session.conversation_id)
    )
    answer = history.conversation.messages[-1]
    assert (answer.role, answer.text, answer.status, answer.error_reason) == (
        pb.MESSAGE_ROLE_ASSISTANT,
        text,
        pb.MESSAGE_STATUS_INCOMPLETE,
        "MODEL_ANSWER_INCOMPLETE",
    )


async def test_another_users_thread_is_not_found(
    start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent, service = await agent_service(start_agent, start_service)
    events = await collect(chat(service, "private question", user="alice"))
    thread_id = events[0].session.conversation_id
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(chat(service, "let me in", user="mallory", conversation_id=thread_id))
    details = status_details(failed.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    # straight to the agent server, as the service would forward it for mallory
    service_headers = {SERVICE_AUTH[0]: SERVICE_AUTH[1], "X-HealthAgent-User": "mallory"}
    for kind in ("threads.get_by_id", "items.list"):
        status, _ = await post_chatkit(
            agent, chatkit_request(kind, thread_id=thread_id), service_headers
        )
        assert status == 404, kind
    status, body = await post_chatkit(agent, chatkit_request("threads.list"), service_headers)
    assert status == 200 and body[0]["data"] == []
    alice = {SERVICE_AUTH[0]: SERVICE_AUTH[1], "X-HealthAgent-User": "alice"}
    status, body = await post_chatkit(agent, chatkit_request("threads.list"), alice)
    assert status == 200 and [thread["id"] for thread in body[0]["data"]] == [thread_id]


async def test_the_agent_server_refuses_requests_without_the_services_credential(
    start_agent: AgentFactory,
) -> None:
    agent = await start_agent()
    body = chatkit_request("threads.create", input=user_input("hello"))
    for headers in (
        {"X-HealthAgent-User": "alice"},
        {"Authorization": "Bearer not-the-credential", "X-HealthAgent-User": "alice"},
    ):
        status, _ = await post_chatkit(agent, body, headers)
        assert status == 401
    # the credential without a user is a bad request, not a request for nobody
    status, _ = await post_chatkit(agent, body, {SERVICE_AUTH[0]: SERVICE_AUTH[1]})
    assert status == 400


async def test_minted_tokens_reach_the_agent_server_directly_until_logout(
    start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent, service = await agent_service(start_agent, start_service)
    minted = await service.stub.MintSession(
        pb.MintSessionRequest(user="alice", ttl_seconds=120), timeout=10
    )
    assert minted.workflow_id == "agent" and minted.kind == pb.SESSION_KIND_CHATKIT
    assert 110 <= minted.session.ttl_seconds <= 120
    bearer = {"Authorization": f"Bearer {minted.client_secret}"}
    body = chatkit_request("threads.create", input=user_input("hi from the web UI"))
    status, events = await post_chatkit(agent, body, bearer)
    assert status == 200 and events[0]["type"] == "thread.created"
    thread_id = events[0]["thread"]["id"]
    # the token is alice's: her threads, and only hers, whatever the header claims
    status, listed = await post_chatkit(
        agent, chatkit_request("threads.list"), {**bearer, "X-HealthAgent-User": "bob"}
    )
    assert status == 200 and [thread["id"] for thread in listed[0]["data"]] == [thread_id]
    history = await collect(chat(service, "and over gRPC", conversation_id=thread_id))
    assert _done(history).text.startswith("You said")
    revoked = await service.stub.RevokeSessions(pb.RevokeSessionsRequest(user="alice"))
    assert revoked.revoked_sessions >= 1
    status, _ = await post_chatkit(agent, chatkit_request("threads.list"), bearer)
    assert status == 401
    # a token minted after the logout works
    fresh = await service.stub.MintSession(pb.MintSessionRequest(user="alice"), timeout=10)
    status, _ = await post_chatkit(
        agent, chatkit_request("threads.list"), {"Authorization": f"Bearer {fresh.client_secret}"}
    )
    assert status == 200


async def test_minted_tokens_are_signed_jwts_for_the_user_lasting_at_most_600_s(
    start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent, service = await agent_service(start_agent, start_service)
    for asked, lifetime in ((120, 120), (600, 600), (None, 600)):
        request = pb.MintSessionRequest(user="alice")
        if asked is not None:
            request.ttl_seconds = asked
        minted = await service.stub.MintSession(request, timeout=10)
        assert jwt.get_unverified_header(minted.client_secret)["alg"] == "HS256"
        claims = jwt.decode(
            minted.client_secret,
            TOKEN_SECRET,
            algorithms=["HS256"],
            audience=DEFAULT_AGENT_TOKEN_AUDIENCE,
        )
        assert claims["sub"] == "alice" and claims["aud"] == DEFAULT_AGENT_TOKEN_AUDIENCE
        # exp is whole seconds, iat is not: the lifetime is what was asked, to the second
        assert lifetime - 1 < claims["exp"] - claims["iat"] <= lifetime, (asked, claims)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.stub.MintSession(
            pb.MintSessionRequest(user="alice", ttl_seconds=601), timeout=10
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # expiry is checked by the agent server itself (beyond the 30 s clock-skew leeway)
    now = int(time.time())
    expired = jwt.encode(
        {
            "iss": "healthagent",
            "sub": "alice",
            "aud": DEFAULT_AGENT_TOKEN_AUDIENCE,
            "iat": now - 700,
            "exp": now - 100,
        },
        TOKEN_SECRET,
        algorithm="HS256",
    )
    bearer = {"Authorization": f"Bearer {expired}"}
    assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 401


async def test_a_token_for_another_audience_is_refused(
    start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent = await start_agent()
    service = await start_service(
        **service_env(agent, HEALTHAGENT_AGENT_TOKEN_AUDIENCE="some-other-agent")
    )
    minted = await service.stub.MintSession(pb.MintSessionRequest(user="alice"), timeout=10)
    status, _ = await post_chatkit(
        agent,
        chatkit_request("threads.list"),
        {"Authorization": f"Bearer {minted.client_secret}"},
    )
    assert status == 401


async def test_threads_survive_a_restart_of_the_agent_server(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent, service = await agent_service(start_agent, start_service)
    first = await collect(chat(service, "remember this"))
    conversation_id = first[0].session.conversation_id
    listen = f"127.0.0.1:{agent.port}"
    await agent.stop()
    await start_agent(listen)
    second = await collect(chat(service, "what did I say?", conversation_id=conversation_id))
    assert _done(second).text.startswith("You said: what did I say?")
    assert user_messages(emulator.model_requests[-1]) == ["remember this", "what did I say?"]


def _assistant_texts(events: list[dict[str, Any]]) -> list[str]:
    return [
        part["text"]
        for event in events
        if event["type"] == "thread.item.done" and event["item"]["type"] == "assistant_message"
        for part in event["item"]["content"]
    ]


async def _record_of(emulator: ChatKitEmulator, text: str) -> Any:
    for _ in range(200):
        for record in reversed(emulator.model_requests):
            if user_messages(record)[-1:] == [text]:
                return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"the model never received {text!r}")


async def _left_at(record: Any) -> float:
    for _ in range(1500):  # 3 s
        if record.client_left_at is not None:
            break
        await asyncio.sleep(0.002)
    assert record.client_left_at is not None, f"the model request stayed open: {record.outcome}"
    return float(record.client_left_at)


@pytest.mark.slow
async def test_a_caller_who_leaves_stops_the_agent_and_its_model_request(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent = await start_agent()
    # 200 calls in a few seconds: more than the per-user rate limit lets one user make
    service = await start_service(**service_env(agent, HEALTHAGENT_RATE_LIMIT_PER_MINUTE="0"))
    latencies: list[float] = []
    cancels = 200
    for index in range(cancels):
        text = f"tell me a long story {index} [pace=20][chunks=500]"
        call = chat(service, text)
        async for event in call:
            if event.WhichOneof("event") == "chunk":
                break
        cancelled_at = time.monotonic()
        call.cancel()
        record = await _record_of(emulator, text)
        latencies.append(await _left_at(record) - cancelled_at)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"model request closed after a cancel: p50 {latencies[len(latencies) // 2] * 1000:.1f} "
        f"ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms ({cancels} cancels)"
    )
    assert p99 < 0.1, f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    # the runs stopped: no model request after any of them, each closed by the client
    records = list(emulator.model_requests)[-cancels:]
    assert [r.outcome for r in records] == ["client_closed"] * cancels
    # the partial answer is kept, in the agent's thread and in the service's history
    conversation_id = await _last_conversation(service)
    await asyncio.sleep(0.2)
    history = await service.stub.GetConversation(
        pb.GetConversationRequest(user="alice", conversation_id=conversation_id)
    )
    answer = history.conversation.messages[-1]
    assert answer.role == pb.MESSAGE_ROLE_ASSISTANT and answer.error_reason == "CANCELLED"
    assert answer.text
    page = await agent.app.chatkit.store.load_thread_items(
        conversation_id, None, 50, "asc", RequestContext("alice", "service")
    )
    kept = [item for item in page.data if isinstance(item, AssistantMessageItem)]
    assert len(kept) == 1 and answer.text.startswith(kept[0].content[0].text[:20])


async def test_a_missed_deadline_stops_the_model_request(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(start_agent, start_service)
    text = "a slow answer [pace=50][chunks=500]"
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(chat(service, text, timeout=1.0))
    assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    left = await _left_at(await _record_of(emulator, text))
    assert left - started < 1.0 + 0.5


async def _last_conversation(service: Any) -> str:
    page = await service.stub.ListConversations(pb.ListConversationsRequest(user="alice"))
    return str(page.conversations[0].id)


async def test_usage_reaches_the_token_metric(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent = await start_agent()
    service = await start_service(**service_env(agent, HEALTHAGENT_METRICS_LISTEN="127.0.0.1:0"))
    url = f"http://127.0.0.1:{service.running.metrics_port}/metrics"
    name = 'healthagent_tokens_total{direction="output",workflow=""}'

    async def output_tokens() -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(url)).text
        found = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(found[0].rsplit(" ", 1)[1]) if found else 0.0

    before = await output_tokens()
    done = _done(await collect(chat(service, "count my tokens")))
    assert done.usage.output_tokens > 0
    assert await output_tokens() == before + done.usage.output_tokens


async def test_sdk_tracing_is_off_unless_asked_for(start_agent: AgentFactory) -> None:
    assert (await start_agent()).app.chatkit.run_config.tracing_disabled
    traced = await start_agent(HEALTHAGENT_AGENT_TRACING="true")
    assert not traced.app.chatkit.run_config.tracing_disabled
    # never without a key: traces would go to OpenAI
    keyless = await start_agent(HEALTHAGENT_AGENT_TRACING="true", OPENAI_API_KEY="")
    assert keyless.app.chatkit.run_config.tracing_disabled


async def test_the_migrated_example_runs_its_handoff_on_the_configured_model(
    emulator: ChatKitEmulator, start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    _, service = await agent_service(
        start_agent,
        start_service,
        HEALTHAGENT_AGENT="docs.examples.migrated_agent:build_agent",
        HEALTHAGENT_AGENT_MODEL="gpt-test-model",
    )
    done = _done(await collect(chat(service, "I sleep badly [call transfer_to_sleep_coach]")))
    assert done.text
    router, coach = list(emulator.model_requests)[-2:]
    assert "transfer_to_sleep_coach" in router.tools
    # the agent handed off to names no model either: it runs on HEALTHAGENT_AGENT_MODEL
    assert router.model == coach.model == "gpt-test-model"
    assert coach.input[0][0] == "system" and coach.input[0][1] != router.input[0][1]


async def test_users_with_any_printable_name_chat_and_log_out(
    start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent, service = await agent_service(start_agent, start_service)
    user = "José 用户 %41"
    events = await collect(chat(service, "hola", user=user))
    assert events[0].session.user == user and _done(events).text.startswith("You said: hola")
    page = await agent.app.chatkit.store.load_threads(
        10, None, "asc", RequestContext(user, "service")
    )
    assert [thread.id for thread in page.data] == [events[0].session.conversation_id]
    minted = await service.stub.MintSession(pb.MintSessionRequest(user=user), timeout=10)
    bearer = {"Authorization": f"Bearer {minted.client_secret}"}
    assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 200
    await service.stub.RevokeSessions(pb.RevokeSessionsRequest(user=user))
    assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 401


async def test_logout_reaches_an_agent_server_on_loopback_without_a_credential(
    start_agent: AgentFactory, start_service: ServiceFactory
) -> None:
    agent = await start_agent(HEALTHAGENT_CHATKIT_AUTH_HEADER="")
    service = await start_service(**service_env(agent, HEALTHAGENT_CHATKIT_AUTH_HEADER=""))
    minted = await service.stub.MintSession(pb.MintSessionRequest(user="alice"), timeout=10)
    bearer = {"Authorization": f"Bearer {minted.client_secret}"}
    assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 200
    await service.stub.RevokeSessions(pb.RevokeSessionsRequest(user="alice"))
    assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 401


async def test_logout_compares_the_services_clock_with_the_tokens(
    start_agent: AgentFactory,
) -> None:
    agent = await start_agent()
    issued = issue_agent_token(TOKEN_SECRET, DEFAULT_AGENT_TOKEN_AUDIENCE, "carol", 60)
    bearer = {"Authorization": f"Bearer {issued.token}"}
    service = {SERVICE_AUTH[0]: SERVICE_AUTH[1]}
    revoke_url = agent.url.removesuffix("chatkit") + "tokens/revoke"
    async with httpx.AsyncClient(timeout=10) as http:
        # the service's clock said the logout came before this token was issued: it stands
        # (the agent server's own clock, later, would have voided it)
        before = {"user": "carol", "revoked_before": issued.issued_at - 100}
        assert (await http.post(revoke_url, json=before, headers=service)).status_code == 200
        assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 200
        after = {"user": "carol", "revoked_before": issued.issued_at + 1}
        assert (await http.post(revoke_url, json=after, headers=service)).status_code == 200
        assert (await post_chatkit(agent, chatkit_request("threads.list"), bearer))[0] == 401
