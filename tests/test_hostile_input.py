"""Input from a hostile client, over real sockets: whatever either history backend cannot store,
whatever does not decode, and whatever nests or grows without bound is refused INVALID_ARGUMENT
with `BadRequest` naming the field, before any upstream call, identically on SQLite and
PostgreSQL (issue 23, items 3 to 6)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect, status_details
from tests.support.service import Service, ServiceFactory, emulator_env
from tests.support.stores import POSTGRES_DSN, postgres_schema


@pytest.fixture(params=["sqlite", "postgres"])
async def hostile_service(
    request: pytest.FixtureRequest, emulator: ChatKitEmulator, start_service: ServiceFactory
) -> AsyncIterator[Service]:
    """The service on one history backend."""
    if request.param == "sqlite":
        yield await start_service(**emulator_env(emulator))
        return
    async with postgres_schema() as schema:
        yield await start_service(
            **emulator_env(
                emulator,
                HEALTHAGENT_DATABASE_URL=POSTGRES_DSN,
                HEALTHAGENT_DATABASE_SCHEMA=schema,
            )
        )


async def refused(call: Any) -> tuple[str, str]:
    """The one field violation of a call that must fail INVALID_ARGUMENT."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        result = await call if not hasattr(call, "__aiter__") else await collect(call)
        del result
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.reason == "INVALID_REQUEST"
    assert len(details.field_violations) == 1, details.field_violations
    assert "Error" not in details.message and "class" not in details.message
    return details.field_violations[0]


async def test_what_a_backend_cannot_store_is_refused_before_the_upstream(
    hostile_service: Service, emulator: ChatKitEmulator
) -> None:
    stub = hostile_service.stub
    first = await collect(stub.Chat(pb.ChatRequest(message="steps [tool]", user="nul")))
    conversation = first[0].session.conversation_id
    call = next(e.tool_call for e in first if e.WhichOneof("event") == "tool_call")
    requests_before = emulator.stats.conversation_requests
    assert (await refused(stub.Chat(pb.ChatRequest(message="a\x00b", user="nul"))))[0] == "message"
    too_long_id = pb.ToolOutput(call_id="c" * 200_000, output_json="{}")
    nul_id = pb.ToolOutput(call_id="call\x00", output_json="{}")
    for output in (too_long_id, nul_id):
        request = pb.ChatRequest(user="nul", conversation_id=conversation, tool_output=output)
        assert (await refused(stub.Chat(request)))[0] == "tool_output.call_id"
    assert emulator.stats.conversation_requests == requests_before  # nothing reached upstream
    # the tool call is still pending, and answering it properly works on both backends
    answer = pb.ToolOutput(call_id=call.call_id, output_json='{"nul": "\\u0000"}')
    events = await collect(
        stub.Chat(pb.ChatRequest(user="nul", conversation_id=conversation, tool_output=answer))
    )
    assert events[-1].WhichOneof("event") == "response_done"
    stored = await stub.GetConversation(
        pb.GetConversationRequest(user="nul", conversation_id=conversation)
    )
    assert [m.status for m in stored.conversation.messages] == [pb.MESSAGE_STATUS_COMPLETE] * 4


async def test_deep_json_and_forged_page_tokens_are_invalid_arguments(
    hostile_service: Service,
) -> None:
    stub = hostile_service.stub
    deep = "[" * 5000 + "]" * 5000
    for nested in (deep, '{"a":' * 100 + "1" + "}" * 100):
        output = pb.ToolOutput(call_id="call_1", output_json=nested)
        request = pb.ChatRequest(user="deep", conversation_id="cthr_1", tool_output=output)
        field, description = await refused(stub.Chat(request))
        assert field == "tool_output.output_json" and "nest" in description

    def token(document: Any) -> str:
        raw = json.dumps(document) if not isinstance(document, str) else document
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    forged = [
        token("[" * 3000 + "]" * 3000),  # nested deeper than the JSON parser recurses
        token({"u": "deep", "t": "0001-01-01T00:00:00+14:00", "i": "x"}),  # before year 1 in UTC
        token({"u": "deep", "t": "9999-12-31T23:59:59-14:00", "i": "x"}),  # after 9999 in UTC
        token({"u": "deep", "t": "2026-01-01T00:00:00", "i": "x"}),  # no time zone
        token({"u": "deep", "t": "2026-01-01T00:00:00+00:00", "i": ["x"]}),
        token({"u": "deep", "t": "2026-01-01T00:00:00+00:00", "i": "x\n"}),
        "A" * 100_000,
    ]
    for page_token in forged:
        listing = pb.ListConversationsRequest(user="deep", page_token=page_token)
        assert (await refused(stub.ListConversations(listing)))[0] == "page_token"


async def test_requests_that_do_not_decode_are_invalid_arguments(hostile_service: Service) -> None:
    channel = hostile_service.channel
    bad_utf8_user = b"\x0a\x02\xff\xfe"  # field 1 (user), two bytes that are not UTF-8
    bad_utf8_call_id = b"\x12\x01u\x2a\x04\x0a\x02\xc3\x28"  # user "u", tool_output.call_id
    corrupt = b"\xff\xff\xff"
    for method, raw, field in [
        ("MintSession", bad_utf8_user, "user"),
        ("ListConversations", bad_utf8_user, "user"),
        ("Chat", bad_utf8_call_id, "tool_output.call_id"),
        ("MintSession", corrupt, ""),
        ("Chat", corrupt, ""),
        ("ExportConversation", corrupt, ""),
    ]:
        path = f"/healthagent.v1.HealthAgent/{method}"
        # no serializer: the bytes go out as they are
        multicallable: Any = (
            channel.unary_stream(path) if method == "Chat" else channel.unary_unary(path)
        )
        call: Any = multicallable(raw)
        violation = await refused(call)
        assert violation[0] == field, (method, violation)


@pytest.mark.parametrize(
    "look_alike",
    [
        "alice\n",  # a trailing newline
        "alice\u202e",  # right-to-left override
        "al\u200bice",  # zero-width space
        "alice\u2028",  # line separator
        "\ufeffalice",  # byte-order mark (zero-width no-break space)
        "alice\u00a0",  # no-break space
        " alice",
    ],
)
async def test_ids_with_invisible_characters_are_refused(service: Service, look_alike: str) -> None:
    stub = service.stub
    assert (await refused(stub.MintSession(pb.MintSessionRequest(user=look_alike))))[0] == "user"
    device = pb.MintSessionRequest(user="alice", device_id=look_alike)
    assert (await refused(stub.MintSession(device)))[0] == "device_id"
    chat = pb.ChatRequest(user=look_alike, message="hi")
    assert (await refused(stub.Chat(chat)))[0] == "user"
    minted = await stub.MintSession(pb.MintSessionRequest(user="Zoë 山田"))  # plain Unicode
    assert minted.user == "Zoë 山田"


async def test_conversation_ids_are_matched_whole(service: Service) -> None:
    stub = service.stub
    for conversation_id in ("cthr_1\n", "cthr_1\r", "cthr_1 "):
        get = pb.GetConversationRequest(user="u", conversation_id=conversation_id)
        assert (await refused(stub.GetConversation(get)))[0] == "conversation_id"
        chat = pb.ChatRequest(user="u", message="hi", conversation_id=conversation_id)
        assert (await refused(stub.Chat(chat)))[0] == "conversation_id"


async def test_state_variables_are_bounded(service: Service) -> None:
    stub = service.stub
    big_value = pb.MintSessionRequest(user="sv")
    big_value.state_variables["note"].string_value = "x" * (4 * 1024 + 1)
    field, description = await refused(stub.MintSession(big_value))
    assert field == "state_variables['note']" and "4096 bytes" in description
    big_set = pb.MintSessionRequest(user="sv")
    for index in range(5):
        big_set.state_variables[f"k{index}"].string_value = "y" * 4000
    field, description = await refused(stub.MintSession(big_set))
    assert field == "state_variables" and "16384 bytes" in description
    nul = pb.MintSessionRequest(user="sv")
    nul.state_variables["k"].string_value = "a\x00"
    assert (await refused(stub.MintSession(nul)))[0] == "state_variables['k']"
    fits = pb.MintSessionRequest(user="sv")
    for index in range(4):
        fits.state_variables[f"k{index}"].string_value = "z" * 4000
    assert (await stub.MintSession(fits)).client_secret
