"""Hypothesis-generated requests for every RPC: each gets a deliberate status, never UNKNOWN or
INTERNAL, and the server stays SERVING."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.processes import ServeProcess, start_serve
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.api.converter import timestamp
from healthagent_service.upstream.upstream_json import decode_json

UNDELIBERATE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Text with control characters, surrogate-free unicode, emptiness and size.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\t\n",
            "a" * 300,
            "[slow]",
            "[drop]",
            "💥" * 50,
            "x" * 40_000,
            "../../etc/passwd",
            "' OR 1=1 --",
        ]
    ),
)
ids = st.one_of(nasty_text, st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True))
enum_numbers = st.integers(min_value=-5, max_value=2**31 - 1)
values = st.one_of(st.text(max_size=20), st.floats(allow_nan=True), st.booleans(), st.none())


@st.composite
def mint_requests(draw: st.DrawFn) -> pb.MintSessionRequest:
    request = pb.MintSessionRequest(user=draw(ids), device_id=draw(ids))
    request.kind = draw(st.sampled_from([0, 1, 2, draw(enum_numbers)]))  # type: ignore[assignment]
    if draw(st.booleans()):
        request.version = draw(nasty_text)
    if draw(st.booleans()):
        request.ttl_seconds = draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))
    for name, value in draw(st.dictionaries(nasty_text, values, max_size=70)).items():
        if value is None:
            request.state_variables[name].null_value = 0  # type: ignore[assignment]
        elif isinstance(value, bool):
            request.state_variables[name].bool_value = value
        elif isinstance(value, float):
            request.state_variables[name].number_value = value
        else:
            request.state_variables[name].string_value = value
    return request


@st.composite
def chat_requests(draw: st.DrawFn) -> pb.ChatRequest:
    request = pb.ChatRequest(user=draw(ids), device_id=draw(ids))
    choice = draw(st.sampled_from(["message", "tool", "none"]))
    if choice == "message":
        request.message = draw(nasty_text)
    elif choice == "tool":
        request.tool_output.CopyFrom(pb.ToolOutput(call_id=draw(ids), output_json=draw(nasty_text)))
    if draw(st.booleans()):
        request.conversation_id = draw(ids)
    return request


REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "MintSession": mint_requests(),
    "Chat": chat_requests(),
    "ListConversations": st.builds(
        pb.ListConversationsRequest,
        user=ids,
        page_size=st.integers(-(2**31), 2**31 - 1),
        page_token=nasty_text,
    ),
    "GetConversation": st.builds(pb.GetConversationRequest, user=ids, conversation_id=ids),
    "DeleteConversation": st.builds(pb.DeleteConversationRequest, user=ids, conversation_id=ids),
    "ExportConversation": st.builds(
        pb.ExportConversationRequest, user=ids, conversation_id=ids, format=enum_numbers
    ),
    "RevokeSessions": st.builds(pb.RevokeSessionsRequest, user=ids),
}


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServeProcess]:
    server = start_serve(
        HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS="0",
        HEALTHAGENT_EMULATOR_SLOW_FIRST_BYTE_SECONDS="0",
        HEALTHAGENT_RATE_LIMIT_PER_MINUTE="0",
    )
    yield server
    assert server.terminate() == 0
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def stub(fuzz_server: ServeProcess) -> Iterator[pb_grpc.HealthAgentStub]:
    with grpc.insecure_channel(fuzz_server.address) as channel:
        yield pb_grpc.HealthAgentStub(channel)


@pytest.mark.parametrize("rpc", sorted(REQUESTS))
def test_every_request_gets_a_deliberate_status(
    rpc: str, stub: pb_grpc.HealthAgentStub, fuzz_server: ServeProcess
) -> None:
    seen: set[grpc.StatusCode] = set()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(REQUESTS[rpc])
    def check(request: Any) -> None:
        try:
            result = getattr(stub, rpc)(request, timeout=15)
            if rpc == "Chat":
                list(result)
            seen.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            code = error.code()
            seen.add(code)
            assert code not in UNDELIBERATE, (rpc, request, error.details())

    check()
    assert seen  # the examples ran
    with grpc.insecure_channel(fuzz_server.address) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="healthagent.v1.HealthAgent"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


@given(
    moment=st.datetimes(
        min_value=datetime.datetime(1, 1, 2),
        max_value=datetime.datetime(9999, 12, 30),
        timezones=st.timezones(),
    )
)
def test_timestamps_match_protobufs_own_conversion(moment: datetime.datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment.astimezone(datetime.UTC))
    assert timestamp(moment) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@given(
    st.one_of(
        st.binary(max_size=60),
        st.builds(
            lambda value, before, after: (before + json.dumps(value) + after).encode(),
            json_values,
            st.sampled_from(["", " ", "\n\t", "x"]),
            st.sampled_from(["", " ", "\r\n", "x", "{", "1"]),
        ),
    )
)
def test_upstream_json_parses_as_json_loads_does(data: bytes) -> None:
    try:  # SSE is UTF-8 only, so json.loads's guess at UTF-16 or 32 has no place here
        expected: Any = json.loads(data.decode())
    except ValueError:
        with pytest.raises(ValueError):
            decode_json(data)
        with pytest.raises(ValueError):
            decode_json(data.decode(errors="surrogateescape"))  # a WebSocket text frame
        return
    assert _same(decode_json(data), expected)
    assert _same(decode_json(data.decode()), expected)


def _same(value: Any, expected: Any) -> bool:
    """Equal, and of the same types throughout (1 == 1.0 == True would hide a change)."""
    if type(value) is not type(expected):
        return False
    if isinstance(expected, dict):
        return list(value) == list(expected) and all(
            _same(value[key], item) for key, item in expected.items()
        )
    if isinstance(expected, list):
        return len(value) == len(expected) and all(map(_same, value, expected))
    if isinstance(expected, float) and math.isnan(expected):
        return math.isnan(value)
    return bool(value == expected)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": NaN, "b": -Infinity}',
        '"\\ud800 lone"',
        "1e400",
        "123456789012345678901234567890",
        '{"a": 1, "a": 2}',
        "  [1.5, -0, 5e-324]\n",
    ],
)
def test_upstream_json_edge_cases_parse_as_json_loads_does(text: str) -> None:
    expected = json.loads(text)
    for data in (text, text.encode()):
        value = decode_json(data)
        assert _same(value, expected), data


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_upstream_json_nested_too_deep_is_a_value_error(depth: int) -> None:
    """Past the parsers' recursion limit: a ValueError, as for any JSON that cannot be read
    (callers map it to UPSTREAM_PROTOCOL_ERROR), not a RecursionError (INTERNAL)."""
    text = '{"a":' + "[" * depth + "]" * depth + "}"
    for data in (text, text.encode()):  # a WebSocket text frame, an SSE event
        with pytest.raises(ValueError):
            decode_json(data)
