"""The emulator's model APIs (`/v1/responses`, `/v1/chat/completions`) driven over real sockets
by the official `openai` SDK and the Agents SDK, as the self-hosted agent server will drive them."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import agents
import httpx
import openai
import pytest
from agents import (
    Agent,
    Model,
    ModelBehaviorError,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    RunResultStreaming,
    function_tool,
)
from openai import AsyncOpenAI
from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent

from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.model_api import ModelRequestRecord
from healthagent_service.emulator.script import parse_stamp, requested_calls
from tests.support.service import TEST_API_KEY

MODEL = "gpt-emulated"
HELLO_REPLY = "You said: hello. This reply comes from the HealthAgent emulator."
HELLO_DELTAS = 10  # the words of HELLO_REPLY
REFERENCE_TOOL: Any = {  # Any: the SDK's TypedDict unions reject a plain dict
    "type": "function",
    "name": "lookup_reference_range",
    "parameters": {"type": "object", "properties": {"metric": {"type": "string"}}},
}
HEALTH_TOOL: Any = {**REFERENCE_TOOL, "name": "get_health_data"}

agents.set_tracing_disabled(True)


@pytest.fixture
async def client(emulator: ChatKitEmulator) -> AsyncIterator[AsyncOpenAI]:
    # No SDK retries: each failure trigger must surface as the SDK's error, and at once.
    openai_client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{emulator.port}/v1", api_key=TEST_API_KEY, max_retries=0
    )
    yield openai_client
    await openai_client.close()


def chat_tool(tool: dict[str, Any]) -> Any:
    """A Responses function tool in the Chat Completions shape."""
    return {
        "type": "function",
        "function": {"name": tool["name"], "parameters": tool["parameters"]},
    }


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not reached in {timeout} s")
        await asyncio.sleep(0.002)


async def raw_stream(
    emulator: ChatKitEmulator, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[tuple[str | None, str]]]:
    """The response and its SSE frames as (event name or None, data), read off the wire."""
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator.port}") as http,
        http.stream(
            "POST", path, json=body, headers={"authorization": f"Bearer {TEST_API_KEY}"}
        ) as response,
    ):
        text = (await response.aread()).decode()
    frames: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) <= {"event", "data"}, block
        frames.append((fields.get("event"), fields["data"]))
    return response, frames


# -- Responses, through the openai SDK and on the wire -------------------------------------


async def test_responses_stream_is_the_official_event_sequence(emulator: ChatKitEmulator) -> None:
    response, frames = await raw_stream(
        emulator, "/v1/responses", {"model": MODEL, "input": "hello", "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(data) for _, data in frames]
    assert [name for name, _ in frames] == [event["type"] for event in events]
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * HELLO_DELTAS,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    item = events[2]["item"]
    assert re.fullmatch(r"msg_[0-9a-f]{48}", item["id"])
    assert item == {
        "id": item["id"],
        "type": "message",
        "status": "in_progress",
        "content": [],
        "role": "assistant",
    }
    assert events[3]["part"] == {
        "type": "output_text",
        "annotations": [],
        "logprobs": [],
        "text": "",
    }
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert all(
        (d["item_id"], d["output_index"], d["content_index"]) == (item["id"], 0, 0) for d in deltas
    )
    assert "".join(d["delta"] for d in deltas) == HELLO_REPLY
    assert events[-4]["text"] == HELLO_REPLY
    final = events[-1]["response"]
    assert re.fullmatch(r"resp_[0-9a-f]{48}", final["id"])
    assert events[0]["response"]["id"] == final["id"]
    assert (final["object"], final["status"], final["model"]) == ("response", "completed", MODEL)
    assert final["output"] == [events[-2]["item"]]
    assert final["output"][0]["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == HELLO_REPLY
    assert final["usage"] == {
        "input_tokens": 1,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": HELLO_DELTAS,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 1 + HELLO_DELTAS,
    }


async def test_responses_stream_through_the_openai_sdk(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    stream = await client.responses.create(
        model=MODEL, input="hello", stream=True, instructions="Be brief."
    )
    events = [event async for event in stream]
    assert "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)) == HELLO_REPLY
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent)
    assert final.response.output_text == HELLO_REPLY
    assert final.response.instructions == "Be brief."
    usage = final.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (3, 10, 13)
    record = emulator.model_requests[-1]
    assert (record.api, record.model, record.stream, record.outcome) == (
        "responses",
        MODEL,
        True,
        "completed",
    )
    assert record.input == [("system", "Be brief."), ("user", "hello")]
    assert record.output == [("assistant", HELLO_REPLY)]
    assert record.response_id == final.response.id and record.client_left_at is None
    assert emulator.stats.model_streams_completed == 1 and emulator.stats.streams_open == 0


async def test_responses_without_a_stream(emulator: ChatKitEmulator, client: AsyncOpenAI) -> None:
    response = await client.responses.create(model=MODEL, input="hello")
    assert response.status == "completed" and response.output_text == HELLO_REPLY
    assert response.usage is not None and response.usage.output_tokens == HELLO_DELTAS
    record = emulator.model_requests[-1]
    assert (record.stream, record.outcome, record.response_id) == (False, "completed", response.id)


async def test_responses_function_call_events(emulator: ChatKitEmulator) -> None:
    body = {
        "model": MODEL,
        "input": 'what is normal? [call lookup_reference_range {"metric": "steps"}]',
        "tools": [REFERENCE_TOOL],
        "stream": True,
    }
    _, frames = await raw_stream(emulator, "/v1/responses", body)
    events = [json.loads(data) for _, data in frames]
    call_events = events[events.index(next(e for e in events if e.get("output_index") == 1)) :]
    assert [event["type"] for event in call_events] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = call_events[0]["item"]
    assert re.fullmatch(r"fc_[0-9a-f]{48}", added["id"])
    assert re.fullmatch(r"call_[0-9a-f]{32}", added["call_id"])
    assert (added["type"], added["name"], added["arguments"]) == (
        "function_call",
        "lookup_reference_range",
        "",
    )
    assert call_events[1]["delta"] == '{"metric":"steps"}'
    assert call_events[2]["arguments"] == '{"metric":"steps"}'
    assert call_events[3]["item"] == {
        **added,
        "arguments": '{"metric":"steps"}',
        "status": "completed",
    }
    final = call_events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me look that up."
    assert final["usage"]["output_tokens"] == 5 + 1  # five words and one call
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


async def test_sameids_numbers_the_output_items_the_same_every_answer(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    text = '[sameids] what is normal? [call lookup_reference_range {"metric": "steps"}]'
    body = {"model": MODEL, "input": text, "tools": [REFERENCE_TOOL], "stream": True}
    _, frames = await raw_stream(emulator, "/v1/responses", body)
    final = json.loads(frames[-1][1])["response"]
    assert [item["id"] for item in final["output"]] == ["msg_0", "fc_1"]
    call = final["output"][1]
    assert re.fullmatch(r"call_[0-9a-f]{32}", call["call_id"])  # call ids stay random
    # the answer to the tool's result, and an answer without a stream: the same ids again
    after_tool: Any = [
        {"role": "user", "content": text},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "{}"},
    ]
    body = {"model": MODEL, "input": after_tool, "stream": True}
    _, frames = await raw_stream(emulator, "/v1/responses", body)
    assert [item["id"] for item in json.loads(frames[-1][1])["response"]["output"]] == ["msg_0"]
    response = await client.responses.create(model=MODEL, input=after_tool)
    assert [item.id for item in response.output] == ["msg_0"]
    # without the trigger the ids are random
    response = await client.responses.create(model=MODEL, input="hello")
    assert re.fullmatch(r"msg_[0-9a-f]{48}", response.output[0].id or "")


# -- Chat Completions ----------------------------------------------------------------------


async def test_chat_completions_stream_on_the_wire(emulator: ChatKitEmulator) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "[tool]"}],
        "tools": [chat_tool(HEALTH_TOOL)],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, frames = await raw_stream(emulator, "/v1/chat/completions", body)
    assert all(name is None for name, _ in frames)
    assert frames[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", chunks[0]["id"])
    assert all("usage" in chunk for chunk in chunks)  # null until the last, as with include_usage
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Let me look at your recent activity."
    opened, arguments = (c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[-4:-2])
    assert opened["index"] == 0 and re.fullmatch(r"call_[0-9a-f]{32}", opened["id"])
    assert opened["function"] == {"name": "get_health_data", "arguments": ""}
    assert arguments == {"index": 0, "function": {"arguments": '{"metric":"steps","days":7}'}}
    assert chunks[-2]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 7 + 1
    assert chunks[-1]["usage"]["total_tokens"] == 1 + 8
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


async def test_chat_completions_through_the_openai_sdk(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 10)
    record = emulator.model_requests[-1]
    assert (record.api, record.outcome) == ("chat.completions", "completed")
    assert record.input == [("system", "Be brief."), ("user", "hello")]


async def test_chat_completions_without_usage_unless_asked(emulator: ChatKitEmulator) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True}
    _, frames = await raw_stream(emulator, "/v1/chat/completions", body)
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_completions_without_a_stream(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": '[call lookup_reference_range {"metric": "sleep"}]'}],
        tools=[chat_tool(REFERENCE_TOOL)],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == (
        "lookup_reference_range",
        '{"metric":"sleep"}',
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5 + 1
    assert emulator.model_requests[-1].stream is False


# -- planning ------------------------------------------------------------------------------


def test_call_triggers_parse_names_and_json_arguments() -> None:
    assert requested_calls("[call a]") == (("a", "{}"),)
    assert requested_calls('x [CALL get_x {"k": [1, {"y": "]"}]}] y [call b {}]') == (
        ("get_x", '{"k":[1,{"y":"]"}]}'),
        ("b", "{}"),
    )
    assert requested_calls("[call a {not json}]") == ()
    assert requested_calls("[call a [1]]") == ()  # arguments must be an object
    assert requested_calls('[call a {"k": 1} trailing]') == ()
    assert requested_calls("[call]") == ()


async def test_only_offered_tools_are_called(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    not_offered = await client.responses.create(model=MODEL, input="[tool] [call nowhere]")
    assert [item.type for item in not_offered.output] == ["message"]
    assert not_offered.output_text == "Let me look at your recent activity."
    refused = await client.responses.create(
        model=MODEL,
        input="[tool]",
        tools=[HEALTH_TOOL],
        tool_choice="none",
    )
    assert [item.type for item in refused.output] == ["message"]
    both = await client.responses.create(
        model=MODEL,
        input='[tool] [call lookup_reference_range {"metric": "hr"}] [call nowhere]',
        tools=[HEALTH_TOOL, REFERENCE_TOOL],
    )
    calls = [(item.name, item.arguments) for item in both.output if item.type == "function_call"]
    assert calls == [
        ("get_health_data", '{"metric":"steps","days":7}'),
        ("lookup_reference_range", '{"metric":"hr"}'),
    ]
    assert emulator.model_requests[-1].tools == ["get_health_data", "lookup_reference_range"]


async def test_the_last_user_message_is_planned_and_tool_results_are_answered(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    history: list[Any] = [
        {"role": "user", "content": "[ratelimit] earlier"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Earlier answer.", "annotations": []}],
        },
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
    ]
    answer = await client.responses.create(model=MODEL, input=history)
    assert answer.output_text == HELLO_REPLY  # the earlier [ratelimit] is not the last message
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a":1}'}
    results: list[Any] = [
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": '{"b": 2, "a": 1}'},
    ]
    answer = await client.responses.create(model=MODEL, input=[*history, *results])
    assert answer.output_text == 'Thanks. The tool returned {"a": 1, "b": 2}.'
    assert emulator.model_requests[-1].input == [
        ("user", "[ratelimit] earlier"),
        ("assistant", "Earlier answer."),
        ("user", "hello"),
        ("tool_call", 'f {"a":1}'),
        ("tool", '{"b": 2, "a": 1}'),
    ]
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "[error]"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "plain text"},
        ],
    )
    assert completion.choices[0].message.content == 'Thanks. The tool returned "plain text".'
    assert emulator.model_requests[-1].input == [
        ("user", "[error]"),
        ("tool_call", "f {}"),
        ("tool", "plain text"),
    ]


async def test_chunks_pace_and_stamp(emulator: ChatKitEmulator, client: AsyncOpenAI) -> None:
    before = time.monotonic_ns()
    stream = await client.responses.create(
        model=MODEL, input="[chunks=5] [pace=40] [stamp]", stream=True
    )
    deltas = [e.delta async for e in stream if isinstance(e, ResponseTextDeltaEvent)]
    after = time.monotonic_ns()
    assert len(deltas) == 5
    stamps = [parse_stamp(delta) for delta in deltas]
    assert before < stamps[0] and stamps[-1] < after and stamps == sorted(stamps)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 35_000_000  # [pace=40], not the emulator's 1 ms
    record = emulator.model_requests[-1]
    assert record.output_tokens == 5 and record.output == [("assistant", "".join(deltas))]


async def test_slow_delays_the_first_event_and_stall_pauses_after_two(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    emulator.config = dataclasses.replace(emulator.config, slow_first_byte_seconds=0.3)
    started = time.monotonic()
    stream = await client.responses.create(model=MODEL, input="[slow]", stream=True)
    async for _ in stream:
        assert time.monotonic() - started >= 0.3
        break
    await stream.close()
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[stall]"}], stream=True
    )
    arrivals = [time.monotonic() async for c in chat if c.choices and c.choices[0].delta.content]
    assert arrivals[2] - arrivals[1] >= 0.3
    assert max(b - a for a, b in itertools.pairwise(arrivals)) < 0.3 + 0.25


# -- errors --------------------------------------------------------------------------------


async def test_a_wrong_key_is_refused_with_the_error_envelope(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        await client.with_options(api_key="sk-wrong").responses.create(model=MODEL, input="hi")
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await client.with_options(api_key="sk-wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert [(r.status, r.outcome) for r in emulator.model_requests] == [(401, "rejected")] * 2
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="", input="hi")


@pytest.mark.parametrize("api", ["responses", "chat"])
@pytest.mark.parametrize(
    ("trigger", "error", "status"),
    [
        ("[ratelimit]", openai.RateLimitError, 429),
        ("[http 503]", openai.InternalServerError, 503),
        ("[http 404]", openai.NotFoundError, 404),
    ],
)
async def test_http_triggers_answer_before_the_stream(
    emulator: ChatKitEmulator,
    client: AsyncOpenAI,
    *,
    api: str,
    trigger: str,
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    with pytest.raises(error) as raised:
        if api == "responses":
            await client.responses.create(model=MODEL, input=trigger, stream=True)
        else:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": trigger}], stream=True
            )
    assert raised.value.status_code == status
    body = raised.value.body
    assert isinstance(body, dict) and body["message"] == f"Emulated HTTP {status}."
    if status == 429:
        assert raised.value.response.headers["retry-after"] == "2"
        assert raised.value.code == "rate_limit_exceeded"
    record = emulator.model_requests[-1]
    assert (record.status, record.outcome) == (status, "rejected")
    assert emulator.stats.model_requests_rejected == 1 and emulator.stats.streams_open == 0


async def test_stream_failures_through_the_openai_sdk(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    stream = await client.responses.create(model=MODEL, input="[error]", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events][-3:] == [
        "response.output_text.delta",
        "response.output_text.delta",
        "response.failed",
    ]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert (failed.response.status, failed.response.error.code) == ("failed", "server_error")
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[error]"}], stream=True
    )
    with pytest.raises(openai.APIError) as raised:
        async for _ in chat:
            pass
    assert not isinstance(raised.value, openai.APIStatusError)
    assert raised.value.message == "Emulated model error."
    stream = await client.responses.create(model=MODEL, input="[drop]", stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass
    assert [r.outcome for r in emulator.model_requests] == ["failed", "failed", "dropped"]
    assert emulator.stats.streams_open == 0


async def test_failures_without_a_stream(emulator: ChatKitEmulator, client: AsyncOpenAI) -> None:
    failed = await client.responses.create(model=MODEL, input="[error]")
    assert failed.status == "failed" and failed.error is not None
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[error]"}]
        )
    with pytest.raises(openai.APIConnectionError):
        await client.responses.create(model=MODEL, input="[drop]")
    assert [r.outcome for r in emulator.model_requests] == ["failed", "failed", "dropped"]


async def test_length_stops_the_answer_at_the_token_limit(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    stream = await client.responses.create(model=MODEL, input="hi [length]", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.incomplete"]
    stopped = events[-1]
    assert stopped.type == "response.incomplete"
    assert stopped.response.status == "incomplete"
    assert stopped.response.incomplete_details is not None
    assert stopped.response.incomplete_details.reason == "max_output_tokens"
    assert stopped.response.output_text == "You said: "
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi [length]"}], stream=True
    )
    chunks = [chunk async for chunk in chat]  # ends with [DONE], as a whole answer does
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    whole = await client.responses.create(model=MODEL, input="hi [length]")
    assert (whole.status, whole.output_text) == ("incomplete", "You said: ")
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi [length]"}]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "You said: "
    assert [r.outcome for r in emulator.model_requests] == ["incomplete"] * 4
    assert emulator.stats.streams_open == 0


# -- a client leaving ----------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["[chunks=1000] [pace=300]", "[stall]"])
async def test_a_client_leaving_mid_stream_is_noticed_at_once(
    emulator: ChatKitEmulator, client: AsyncOpenAI, trigger: str
) -> None:
    # The emulator is paused (300 ms between deltas; a 5 s stall) when the client leaves.
    stream = await client.responses.create(model=MODEL, input=trigger, stream=True)
    deltas = 0
    async for event in stream:
        deltas += event.type == "response.output_text.delta"
        if deltas == 2:
            break
    closed_at = time.monotonic()
    await stream.close()
    record = emulator.model_requests[-1]
    await wait_for(lambda: record.outcome == "client_closed", timeout=0.5)
    assert record.client_left_at is not None
    assert 0 <= record.client_left_at - closed_at < 0.1
    assert record.ended_at is not None and record.ended_at >= record.client_left_at - 0.1
    stats = emulator.stats
    assert (stats.streams_open, stats.model_streams_disconnected, stats.streams_disconnected) == (
        0,
        1,
        1,
    )
    assert stats.last_disconnect_at >= record.client_left_at
    assert stats.model_streams_completed == 0


# -- the Agents SDK ------------------------------------------------------------------------

ModelFactory = Callable[[AsyncOpenAI], Model]


def responses_model(client: AsyncOpenAI) -> Model:
    return OpenAIResponsesModel(MODEL, client)


def chat_model(client: AsyncOpenAI) -> Model:
    return OpenAIChatCompletionsModel(MODEL, client)


MODELS = pytest.mark.parametrize("make_model", [responses_model, chat_model])


def agent_for(client: AsyncOpenAI, make_model: ModelFactory, **kwargs: Any) -> Agent[Any]:
    # Chat Completions sends stream_options.include_usage only to api.openai.com unless asked.
    settings = ModelSettings(include_usage=True)
    return Agent(
        name="health",
        instructions="Answer briefly.",
        model=make_model(client),
        model_settings=settings,
        **kwargs,
    )


async def run_streamed(agent: Agent[Any], input: str | list[Any]) -> RunResultStreaming:
    result = Runner.run_streamed(agent, input)
    async for _ in result.stream_events():
        pass
    return result


@MODELS
async def test_agent_text_turn(
    emulator: ChatKitEmulator, client: AsyncOpenAI, make_model: ModelFactory
) -> None:
    result = await run_streamed(agent_for(client, make_model), "hello")
    assert result.final_output == HELLO_REPLY
    usage = result.context_wrapper.usage
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 3, HELLO_DELTAS)
    record = emulator.model_requests[-1]
    assert record.input == [("system", "Answer briefly."), ("user", "hello")]
    assert record.outcome == "completed" and record.stream


@MODELS
async def test_agent_function_tool_round_trip(
    emulator: ChatKitEmulator, client: AsyncOpenAI, make_model: ModelFactory
) -> None:
    asked: list[str] = []

    @function_tool
    def lookup_reference_range(metric: str) -> str:
        """The normal range of a health metric."""
        asked.append(metric)
        return json.dumps({"metric": metric, "low": 6000, "high": 10000})

    agent = agent_for(client, make_model, tools=[lookup_reference_range])
    question = 'Is that normal? [call lookup_reference_range {"metric": "steps"}]'
    result = await run_streamed(agent, question)
    assert asked == ["steps"]
    assert result.final_output == (
        'Thanks. The tool returned {"high": 10000, "low": 6000, "metric": "steps"}.'
    )
    first, second = list(emulator.model_requests)
    assert first.tools == second.tools == ["lookup_reference_range"]
    assert first.output == [
        ("assistant", "Let me look that up."),
        ("tool_call", 'lookup_reference_range {"metric":"steps"}'),
    ]
    assert second.input[-2:] == [
        ("tool_call", 'lookup_reference_range {"metric":"steps"}'),
        ("tool", '{"metric": "steps", "low": 6000, "high": 10000}'),
    ]
    usage = result.context_wrapper.usage
    assert usage.requests == 2
    assert usage.output_tokens == first.output_tokens + second.output_tokens == 6 + 10


@MODELS
async def test_agent_several_turns(
    emulator: ChatKitEmulator, client: AsyncOpenAI, make_model: ModelFactory
) -> None:
    agent = agent_for(client, make_model)
    history: list[Any] = []
    for text in ["hello", "[chunks=3]", "and again"]:
        result = await run_streamed(agent, [*history, {"role": "user", "content": text}])
        history = result.to_input_list()
    assert (
        result.final_output
        == "You said: and again. This reply comes from the HealthAgent emulator."
    )
    records = list(emulator.model_requests)
    assert [r.output_tokens for r in records] == [HELLO_DELTAS, 3, 11]
    assert [role for role, _ in records[-1].input] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert records[-1].input[2] == ("assistant", HELLO_REPLY)


@pytest.mark.parametrize(
    ("make_model", "trigger", "error", "message"),
    [
        (responses_model, "[error]", ModelBehaviorError, "response.failed"),
        (chat_model, "[error]", openai.APIError, "Emulated model error."),
        (responses_model, "[drop]", openai.APIConnectionError, "Connection error."),
        (chat_model, "[drop]", openai.APIConnectionError, "Connection error."),
        (responses_model, "[noend]", ModelBehaviorError, "Model did not produce a final response"),
        (responses_model, "[length]", ModelBehaviorError, "reason='max_output_tokens'"),
        (responses_model, "[ratelimit]", openai.RateLimitError, "Error code: 429"),
        (chat_model, "[ratelimit]", openai.RateLimitError, "Error code: 429"),
        (responses_model, "[http 500]", openai.InternalServerError, "Error code: 500"),
        (chat_model, "[http 502]", openai.InternalServerError, "Error code: 502"),
    ],
)
async def test_agent_failures_raise_what_the_sdk_raises(
    emulator: ChatKitEmulator,
    client: AsyncOpenAI,
    *,
    make_model: ModelFactory,
    trigger: str,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        await run_streamed(agent_for(client, make_model), f"hi {trigger}")
    outcomes = ("failed", "dropped", "noend", "rejected", "incomplete")
    assert emulator.model_requests[-1].outcome in outcomes
    assert emulator.stats.streams_open == 0


async def test_agent_on_chat_completions_takes_a_stream_without_its_end_as_the_answer(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    # The SDK demands a finish_reason from api.openai.com only: elsewhere the partial text is
    # the final output. An agent server cannot tell a cut answer from a short one here.
    result = await run_streamed(agent_for(client, chat_model), "[noend]")
    assert result.final_output == "You said: "
    assert emulator.model_requests[-1].outcome == "noend"


async def test_agent_on_chat_completions_takes_an_answer_cut_at_the_token_limit_as_whole(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    # Why the agent server checks finish_reason itself (agent/model.py): the SDK raises only
    # when no text came before `length`.
    result = await run_streamed(agent_for(client, chat_model), "[length]")
    assert result.final_output == "You said: "
    assert emulator.model_requests[-1].outcome == "incomplete"


async def test_agent_failure_without_a_stream(client: AsyncOpenAI) -> None:
    with pytest.raises(ModelBehaviorError, match=re.escape("response.failed")):
        await Runner.run(agent_for(client, responses_model), "[error]")


@MODELS
async def test_agent_cancel_closes_the_model_stream_at_once(
    emulator: ChatKitEmulator, client: AsyncOpenAI, make_model: ModelFactory
) -> None:
    result = Runner.run_streamed(agent_for(client, make_model), "[chunks=1000] [pace=300]")
    deltas = 0
    cancelled_at = 0.0
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            deltas += 1
            if deltas == 2:
                cancelled_at = time.monotonic()
                result.cancel()
    record = emulator.model_requests[-1]
    await wait_for(lambda: record.outcome == "client_closed", timeout=0.5)
    assert record.client_left_at is not None
    assert 0 <= record.client_left_at - cancelled_at < 0.1
    assert emulator.stats.streams_open == 0


# -- stats ---------------------------------------------------------------------------------


async def test_stats_endpoints_show_the_model_requests(
    emulator: ChatKitEmulator, client: AsyncOpenAI
) -> None:
    for index in range(25):
        await client.responses.create(model=MODEL, input=f"n{index}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator.port}") as http:
        stats = (await http.get("/_emulator/stats")).json()
        every = (await http.get("/_emulator/model_requests")).json()["data"]
    assert stats["model_requests"] == 25 and stats["model_requests_rejected"] == 0
    latest = stats["model_requests_latest"]
    assert [r["input"] for r in latest] == [[["user", f"n{i}"]] for i in range(5, 25)]
    assert len(every) == 25 and every[-1] == latest[-1]
    record: ModelRequestRecord = emulator.model_requests[-1]
    assert every[-1] == {
        **record.to_json(),
        "input": [["user", "n24"]],
        "output": [["assistant", "You said: n24. This reply comes from the HealthAgent emulator."]],
    }
    assert set(every[-1]) >= {"api", "model", "stream", "tools", "outcome", "client_left_at"}
