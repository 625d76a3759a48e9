"""The agent server's Prometheus endpoint (HEALTHAGENT_AGENT_METRICS_LISTEN): the real ChatKit
server and Agents SDK, the emulator as the model, ChatKit requests and the scrape over loopback
HTTP. Off unless set, and off loopback only with the service's credential."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from healthagent_service.agent.app import RunningAgentServer
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.peers.custom_agents import REFUSED_WORD
from tests.support.agents import (
    SERVICE_AUTH,
    TOKEN_SECRET,
    AgentFactory,
    chatkit_request,
    post_chatkit,
    user_input,
)

USER = "metrics-user-name"
AS_USER = {SERVICE_AUTH[0]: SERVICE_AUTH[1], "X-HealthAgent-User": USER}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(agent: RunningAgentServer) -> tuple[str, Samples]:
    """GET /metrics: its text and {(sample name, labels): value}."""
    assert agent.metrics_port
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def turn(text: str) -> bytes:
    return chatkit_request("threads.create", input=user_input(text))


def effect(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [e["data"] for e in events if e["type"] == "client_effect" and e["name"] == name]
    assert len(found) == 1, [e["type"] for e in events]
    data: dict[str, Any] = found[0]
    return data


async def leave_after_the_first_delta(agent: RunningAgentServer, text: str) -> None:
    """A streaming turn whose caller hangs up once the answer has begun."""
    async with (
        httpx.AsyncClient(timeout=30, trust_env=False) as client,
        client.stream(
            "POST",
            agent.url,
            content=turn(text),
            headers={"content-type": "application/json", **AS_USER},
        ) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"assistant_message.content_part.text_delta"' in line:
                break
        else:
            raise AssertionError("the answer never began")


async def settled(agent: RunningAgentServer, cancelled: float) -> Samples:
    """The metrics once the cancelled turn has been counted (the run stops asynchronously)."""
    for _ in range(100):  # 5 s
        _, samples = await scrape(agent)
        if (
            value(samples, "healthagent_agent_turns_total", outcome="cancelled") == cancelled
            and value(samples, "healthagent_agent_turns_in_flight") == 0
        ):
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"the cancelled turn was never counted: {samples}")


async def test_turns_requests_failures_guardrails_and_tokens_are_scraped(
    emulator: ChatKitEmulator, start_agent: AgentFactory
) -> None:
    agent = await start_agent(
        HEALTHAGENT_AGENT="tests.peers.custom_agents:guarded_agent",
        HEALTHAGENT_AGENT_METRICS_LISTEN="127.0.0.1:0",
    )
    assert agent.metrics_port and agent.metrics_port != agent.port

    # a text turn: completed, and the model's usage counted as the agent reported it
    status, events = await post_chatkit(agent, turn("How did I sleep last night?"), AS_USER)
    assert status == 200
    usage = effect(events, "healthagent.usage")
    assert usage["output_tokens"] > 0
    thread_id = events[0]["thread"]["id"]
    _, samples = await scrape(agent)
    assert value(samples, "healthagent_agent_turns_total", outcome="completed") == 1
    assert value(samples, "healthagent_agent_turn_duration_seconds_count", outcome="completed") == 1
    assert (
        value(samples, "healthagent_agent_tokens_total", direction="input")
        == (usage["input_tokens"])
    )
    assert (
        value(samples, "healthagent_agent_tokens_total", direction="output")
        == (usage["output_tokens"])
    )
    assert value(samples, "healthagent_agent_turns_in_flight") == 0

    # the model failing, an input guardrail tripping, a caller leaving mid-answer
    status, events = await post_chatkit(agent, turn("tell me about my heart [http 500]"), AS_USER)
    assert effect(events, "healthagent.error")["reason"] == "MODEL_ERROR"
    status, events = await post_chatkit(agent, turn(f"please {REFUSED_WORD} now"), AS_USER)
    assert effect(events, "healthagent.error")["reason"] == "INPUT_REFUSED"
    await leave_after_the_first_delta(agent, "tell me a long story [pace=20][chunks=500]")
    # requests that run no turn: a list, another thread, no credential, not ChatKit
    assert (await post_chatkit(agent, chatkit_request("threads.list"), AS_USER))[0] == 200
    missing = chatkit_request("threads.get_by_id", thread_id="thr_missing")
    assert (await post_chatkit(agent, missing, AS_USER))[0] == 404
    assert (await post_chatkit(agent, turn("hi"), {"X-HealthAgent-User": USER}))[0] == 401
    assert (await post_chatkit(agent, b'{"type": "no.such"}', AS_USER))[0] == 400

    samples = await settled(agent, cancelled=1)
    assert value(samples, "healthagent_agent_turns_total", outcome="completed") == 1
    assert value(samples, "healthagent_agent_turns_total", outcome="failed") == 2
    assert value(samples, "healthagent_agent_turn_duration_seconds_count", outcome="failed") == 2
    for reason in ("MODEL_ERROR", "INPUT_REFUSED"):
        assert value(samples, "healthagent_agent_turn_failures_total", reason=reason) == 1
    assert (
        value(
            samples,
            "healthagent_agent_guardrail_trips_total",
            guardrail="refuse_marked_messages",
            stage="input",
        )
        == 1
    )
    assert (
        value(samples, "healthagent_agent_tokens_total", direction="output")
        >= (usage["output_tokens"])
    )
    requests = {
        (dict(labels)["operation"], dict(labels)["streaming"], dict(labels)["outcome"]): count
        for (name, labels), count in samples.items()
        if name == "healthagent_agent_requests_total"
    }
    assert requests == {
        ("threads.create", "true", "ok"): 3,
        ("threads.create", "true", "cancelled"): 1,
        ("threads.list", "false", "ok"): 1,
        ("threads.get_by_id", "false", "not_found"): 1,
        ("unknown", "false", "unauthorized"): 1,
        ("unknown", "false", "invalid"): 1,
    }

    # no label names the user, the thread or a secret
    text, _ = await scrape(agent)
    for private in (USER, thread_id, SERVICE_AUTH[1], TOKEN_SECRET, REFUSED_WORD):
        assert private not in text


async def test_the_endpoint_is_off_unless_set_and_on_loopback_without_the_credential(
    start_agent: AgentFactory,
) -> None:
    assert (await start_agent()).metrics_port == 0
    # /metrics names no user, but it is no more open than the agent server itself
    with pytest.raises(ValueError, match="HEALTHAGENT_CHATKIT_AUTH_HEADER"):
        await start_agent(
            HEALTHAGENT_CHATKIT_AUTH_HEADER="", HEALTHAGENT_AGENT_METRICS_LISTEN="0.0.0.0:0"
        )
    keyless = await start_agent(
        HEALTHAGENT_CHATKIT_AUTH_HEADER="", HEALTHAGENT_AGENT_METRICS_LISTEN="127.0.0.1:0"
    )
    _, samples = await scrape(keyless)
    assert value(samples, "healthagent_agent_turns_in_flight") == 0


async def test_a_stopped_agent_server_frees_its_metrics_port(start_agent: AgentFactory) -> None:
    first = await start_agent(HEALTHAGENT_AGENT_METRICS_LISTEN="127.0.0.1:0")
    port = first.metrics_port
    await first.stop()
    # a restart in the same process (the tests, `serve`'s supervised child) takes it again
    second = await start_agent(HEALTHAGENT_AGENT_METRICS_LISTEN=f"127.0.0.1:{port}")
    assert second.metrics_port == port
    _, samples = await scrape(second)
    assert value(samples, "healthagent_agent_turns_in_flight") == 0
