"""Faults injected through the emulator, over real sockets: every one ends in a deliberate
status, the partial text is kept in the history, and no stream ends OK with a truncated answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from websockets.asyncio.server import ServerConnection, serve

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.script import plan_reply
from tests.support.calls import event_kinds, status_details
from tests.support.loopback_server import OneRequestUpstream, answer_whole, listening
from tests.support.service import ServiceFactory, emulator_env
from tests.support.stores import POSTGRES_DSN, postgres_schema

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ALL_CHUNKS = -1

FAULTS = [
    # (trigger, status, reason, chunks that reach the caller first)
    ("[drop]", UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", 2),
    ("[stall]", UNAVAILABLE, "UPSTREAM_TIMEOUT", 2),
    ("[slow]", UNAVAILABLE, "UPSTREAM_TIMEOUT", 0),
    ("[malformed]", UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR", 2),
    ("[nodata]", UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", ALL_CHUNKS),
    ("[huge]", UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR", 2),
    ("[noend]", UNAVAILABLE, "UPSTREAM_STREAM_TRUNCATED", 2),
    ("[error]", UNAVAILABLE, "UPSTREAM_STREAM_ERROR", 2),
    ("[http 429]", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", 0),
    ("[http 500]", UNAVAILABLE, "UPSTREAM_ERROR", 0),
    ("[http 503]", UNAVAILABLE, "UPSTREAM_ERROR", 0),
    ("[http 401]", UNAVAILABLE, "UPSTREAM_SESSION_REJECTED", 0),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f[0] for f in FAULTS])
async def test_fault_gives_a_deliberate_status_and_keeps_the_partial_text(
    fault: tuple[str, grpc.StatusCode, str, int],
    emulator: ChatKitEmulator,
    start_service: ServiceFactory,
) -> None:
    trigger, code, reason, chunks = fault
    if chunks == ALL_CHUNKS:
        chunks = len(plan_reply(f"tell me {trigger}").chunks)
    service = await start_service(
        **emulator_env(emulator, HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS=0.5)
    )
    stub = service.stub
    first = [e async for e in stub.Chat(pb.ChatRequest(message="hello", user="fay"))]
    conversation_id = first[0].session.conversation_id
    received: list[pb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in stub.Chat(
            pb.ChatRequest(
                message=f"tell me {trigger}", user="fay", conversation_id=conversation_id
            )
        ):
            received.append(event)
    details = status_details(failure.value)
    assert (details.code, details.reason) == (code, reason)
    assert event_kinds(received).count("chunk") == chunks
    assert "response_done" not in event_kinds(received)  # never OK with a truncated answer
    if code is UNAVAILABLE or code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert details.retry_delay_seconds is not None
    history = (
        await stub.GetConversation(
            pb.GetConversationRequest(user="fay", conversation_id=conversation_id)
        )
    ).conversation
    answer = history.messages[-1]
    assert answer.role == pb.MESSAGE_ROLE_ASSISTANT and answer.error_reason == reason
    partial = "".join(e.chunk.text for e in received if e.WhichOneof("event") == "chunk")
    assert answer.text == partial
    expected_status = pb.MESSAGE_STATUS_INCOMPLETE if partial else pb.MESSAGE_STATUS_FAILED
    assert answer.status == expected_status


async def test_connection_refused(start_service: ServiceFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = await start_service(
        HEALTHAGENT_UPSTREAM="chatkit",
        OPENAI_API_KEY="sk-x",
        OPENAI_WORKFLOW_ID="wf",
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        [e async for e in service.stub.Chat(pb.ChatRequest(message="hi", user="u"))]
    assert status_details(failure.value).reason == "UPSTREAM_UNAVAILABLE"


class _HoardingUpstream(OneRequestUpstream):
    """A bad upstream on loopback: answers every turn with an event stream whose first event
    is 3 MiB long and never ends (under the 8 MiB event limit, so each alone is allowed)."""

    EVENT_BYTES = 3 * 1024 * 1024

    async def answer(
        self, path: bytes, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        writer.write(b"data: " + b"x" * self.EVENT_BYTES)
        await writer.drain()
        await reader.read()  # hold until the service or the test closes the connection


async def test_streams_together_hold_a_bounded_amount_of_upstream_events(
    start_service: ServiceFactory,
) -> None:
    """Six streams fed 3 MiB events each, with 8 MiB for all: the streams whose growth takes
    the total past it end RESOURCE_EXHAUSTED (UPSTREAM_BUFFER_FULL), the others go on (issue
    23, item 4). Before, every stream held its event: 200 of them took the process to 2.4 GiB."""
    upstream = _HoardingUpstream()
    async with listening(upstream):
        service = await start_service(
            HEALTHAGENT_CHATKIT_URL=f"http://127.0.0.1:{upstream.port}/chatkit",
            HEALTHAGENT_UPSTREAM_BUFFER_BYTES=8 * 1024 * 1024,
            HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS=30,
        )
        calls = [
            service.stub.Chat(pb.ChatRequest(message="hi", user=f"hoard{index}"))
            for index in range(6)
        ]
        pending = {asyncio.ensure_future(call.read()) for call in calls}
        done: set[asyncio.Future[object]] = set()
        deadline = asyncio.get_running_loop().time() + 10
        while len(done) < 4 and asyncio.get_running_loop().time() < deadline:
            finished, pending = await asyncio.wait(
                pending, timeout=1, return_when=asyncio.FIRST_COMPLETED
            )
            done |= finished
        finished, pending = await asyncio.wait(pending, timeout=0.5)  # and no more end
        done |= finished
        streams = service.running.http.streams
        refused = []
        for task in done:
            error = task.exception()
            assert isinstance(error, grpc.aio.AioRpcError), error
            refused.append(status_details(error))
        # 3 MiB each, 8 MiB for all: at most two can hold theirs; a stream that grows while
        # others hold nearly all of it is ended too, so at times a third one goes
        assert 4 <= len(refused) <= 5 and len(pending) == 6 - len(refused)
        assert {(d.code, d.reason) for d in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_BUFFER_FULL")
        }
        assert all(d.retry_delay_seconds for d in refused)
        assert streams.buffered <= 8 * 1024 * 1024
        for call in calls:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for _ in range(100):  # what the cut streams held is let go
        if streams.buffered == 0:
            break
        await asyncio.sleep(0.05)
    assert streams.buffered == 0


def _turn_with_text(thread: str, escaped_text: str) -> bytes:
    """A whole ChatKit turn whose answer is `escaped_text`, written into the JSON as it is
    (escapes included)."""
    created = "2026-12-06T00:00:00"
    content = {"annotations": [], "text": "TEXT", "type": "output_text"}
    item = {"id": "msg_1", "thread_id": thread, "created_at": created}
    update = {"type": "thread.item.updated", "item_id": "msg_1"}
    events: list[dict[str, object]] = [
        {
            "type": "thread.created",
            "thread": {
                "id": thread,
                "created_at": created,
                "status": {"type": "active"},
                "metadata": {},
                "items": {"data": [], "has_more": False},
            },
        },
        {"type": "thread.item.added", "item": {**item, "type": "assistant_message", "content": []}},
        {
            **update,
            "update": {
                "type": "assistant_message.content_part.added",
                "content_index": 0,
                "content": {**content, "text": ""},
            },
        },
        {
            **update,
            "update": {
                "type": "assistant_message.content_part.text_delta",
                "content_index": 0,
                "delta": "TEXT",
            },
        },
        {
            **update,
            "update": {
                "type": "assistant_message.content_part.done",
                "content_index": 0,
                "content": content,
            },
        },
        {
            "type": "thread.item.done",
            "item": {**item, "type": "assistant_message", "content": [content]},
        },
    ]
    return b"".join(
        b"data: " + json.dumps(event).replace('"TEXT"', f'"{escaped_text}"').encode() + b"\n\n"
        for event in events
    )


class _OddTextUpstream(OneRequestUpstream):
    """A self-hosted ChatKit server on loopback whose answers hold text no store takes as it
    is: a NUL (PostgreSQL text cannot hold one), or a lone surrogate escape (not Unicode)."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0

    async def answer(
        self, path: bytes, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.turns += 1
        thread = f"thr_odd{self.turns}"
        text = "lone \\ud800 half" if b"surrogate" in body else "a\\u0000b"
        await answer_whole(writer, b"text/event-stream", _turn_with_text(thread, text))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_upstream_text_no_store_takes_is_stored_alike_or_refused(
    start_service: ServiceFactory, backend: str
) -> None:
    """A NUL in the upstream's answer is stored as U+FFFD on both backends (PostgreSQL refused
    the whole end of the turn, which stayed incomplete); a lone surrogate escape, which
    protobuf cannot encode, ends the turn UNAVAILABLE (it was INTERNAL). Issue 23, item 3's
    sibling on the upstream side."""
    upstream = _OddTextUpstream()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(listening(upstream))
        env: dict[str, str] = {"HEALTHAGENT_CHATKIT_URL": f"http://127.0.0.1:{upstream.port}/ck"}
        if backend == "postgres":
            schema = await stack.enter_async_context(postgres_schema())
            env |= {"HEALTHAGENT_DATABASE_URL": POSTGRES_DSN, "HEALTHAGENT_DATABASE_SCHEMA": schema}
        service = await start_service(**env)
        stub = service.stub
        events = [e async for e in stub.Chat(pb.ChatRequest(message="hi", user="odd"))]
        assert events[-1].response_done.text == "a\x00b"  # the caller gets what was said
        stored = await stub.GetConversation(
            pb.GetConversationRequest(user="odd", conversation_id="thr_odd1")
        )
        answer = stored.conversation.messages[-1]
        assert (answer.status, answer.text) == (pb.MESSAGE_STATUS_COMPLETE, "a\ufffdb")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Chat(pb.ChatRequest(message="surrogate", user="odd")):
                pass
        details = status_details(refused.value)
        assert (details.code, details.reason) == (UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR")


_DEEP = 5_000  # levels: past both parsers' recursion limits (msgspec's and `json`'s)


def _deep_json() -> bytes:
    return b'{"type":"thread.created","thread":' + b"[" * _DEEP + b"]" * _DEEP + b"}"


class _DeepJsonUpstream(OneRequestUpstream):
    """A bad upstream on loopback whose JSON nests 5,000 deep: every ChatKit event, and every
    answer to a session mint."""

    async def answer(
        self, path: bytes, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if path.endswith(b"/chatkit/sessions"):
            await answer_whole(writer, b"application/json", _deep_json())
        else:
            await answer_whole(writer, b"text/event-stream", b"data: " + _deep_json() + b"\n\n")


async def test_upstream_json_nested_past_the_parsers_is_a_protocol_error(
    start_service: ServiceFactory,
) -> None:
    """An upstream event, or a mint's answer, nested 5,000 deep ends the call UNAVAILABLE
    (UPSTREAM_PROTOCOL_ERROR), like any JSON the service cannot read (it was INTERNAL, from a
    RecursionError, with a traceback). Issue 23, item 5's sibling on the upstream side."""
    upstream = _DeepJsonUpstream()
    async with listening(upstream):
        self_hosted = await start_service(
            HEALTHAGENT_CHATKIT_URL=f"http://127.0.0.1:{upstream.port}/ck"
        )
        with pytest.raises(grpc.aio.AioRpcError) as chat:
            async for _ in self_hosted.stub.Chat(pb.ChatRequest(message="hi", user="deep")):
                pass
        hosted = await start_service(
            HEALTHAGENT_UPSTREAM="chatkit",
            OPENAI_API_KEY="sk-x",
            OPENAI_WORKFLOW_ID="wf",
            OPENAI_BASE_URL=f"http://127.0.0.1:{upstream.port}/v1",
        )
        with pytest.raises(grpc.aio.AioRpcError) as mint:
            await hosted.stub.MintSession(pb.MintSessionRequest(user="deep"))
    for failure in (chat, mint):
        details = status_details(failure.value)
        assert (details.code, details.reason) == (UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR")
        assert details.retry_delay_seconds is not None


# what a bad upstream answers in an id: a NUL (PostgreSQL text cannot hold one, SQLite can),
# or a lone surrogate (not Unicode); `json.dumps` writes both as escapes
_NUL, _SURROGATE = "\x00", "\ud800"
_BAD_SESSION_TTL = 300  # a Realtime MintSession with this ttl_seconds is answered a bad id


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)


def _thread_created(thread_id: str) -> dict[str, Any]:
    return {"type": "thread.created", "thread": {"id": thread_id, "title": None}}


class _OddIdUpstream(OneRequestUpstream):
    """A bad upstream on loopback whose answers name ids no store takes as they are: hosted
    ChatKit's session mint (the session id or client secret, by user), a self-hosted ChatKit
    server's turns (the new thread's id, or a client tool call's, by message) and Realtime's
    client secrets (the session id, for a MintSession of `_BAD_SESSION_TTL` seconds)."""

    def _answer(self, path: bytes, body: bytes) -> tuple[bytes, bytes]:
        expires = int(time.time()) + 600
        if path.endswith(b"/chatkit/sessions"):
            user = json.loads(body)["user"]
            session, secret = "cksess_1", "ck_secret"
            if user == "nul-session":
                session = "cksess_" + _NUL
            elif user == "surrogate-secret":
                secret = "ck_" + _SURROGATE
            elif user == "nul-secret":
                secret = "ck_" + _NUL
            answer = {"id": session, "client_secret": secret, "expires_at": expires}
            return b"application/json", json.dumps(answer).encode()
        if path.endswith(b"/realtime/client_secrets"):
            bad = json.loads(body)["expires_after"]["seconds"] == _BAD_SESSION_TTL
            session = "sess_" + _NUL if bad else "sess_1"
            answer = {"value": "ek_1", "expires_at": expires, "session": {"id": session}}
            return b"application/json", json.dumps(answer).encode()
        message = json.loads(body)["params"]["input"]["content"][0]["text"]
        if message == "nul thread":
            return b"text/event-stream", _sse(_thread_created("thr_" + _NUL))
        if message == "surrogate thread":
            return b"text/event-stream", _sse(_thread_created("thr_" + _SURROGATE))
        if message == "long thread":  # storable, but no conversation id a caller may send
            return b"text/event-stream", _sse(_thread_created("thr_" + "a" * 125))
        if message == "newline thread":
            return b"text/event-stream", _sse(_thread_created("thr_x\n"))
        call = {
            "type": "thread.item.done",
            "item": {
                "id": "tc_1",
                "type": "client_tool_call",
                "status": "pending",
                "call_id": "call_" + _NUL,
                "name": "get_steps",
                "arguments": {},
            },
        }
        return b"text/event-stream", _sse(_thread_created("thr_call"), call)

    async def answer(
        self, path: bytes, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await answer_whole(writer, *self._answer(path, body))


async def _realtime_socket_with_a_nul_session_id(connection: ServerConnection) -> None:
    """A Realtime socket whose session is named with a NUL, and which then answers a turn."""
    await connection.send(
        json.dumps({"type": "session.created", "session": {"id": "sess_" + _NUL}})
    )
    async for raw in connection:
        kind = json.loads(raw)["type"]
        if kind == "session.update":
            await connection.send('{"type":"session.updated","session":{}}')
        elif kind == "response.create":
            await connection.send(
                '{"type":"response.output_text.done","item_id":"item_1","text":"Hi."}'
            )
            await connection.send(
                '{"type":"response.done","response":{"status":"completed","output":[]}}'
            )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_upstream_ids_no_store_takes_are_a_protocol_error(
    start_service: ServiceFactory, backend: str
) -> None:
    """A session id, client secret, thread id or call id with a NUL or a lone surrogate (or a
    thread id that is no conversation id, which the caller could not send back), from
    hosted ChatKit's mint, a self-hosted ChatKit server's turn, Realtime's mint or its socket,
    ends the call UNAVAILABLE UPSTREAM_PROTOCOL_ERROR with RetryInfo on both backends, with
    nothing recorded but a whole turn (before: PostgreSQL failed the history write, INTERNAL,
    where SQLite stored the id and the call ended OK). Issue 23, item 3's sibling."""
    upstream = _OddIdUpstream()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(listening(upstream))
        sockets = await stack.enter_async_context(
            serve(_realtime_socket_with_a_nul_session_id, "127.0.0.1", 0)
        )
        socket_port = sockets.sockets[0].getsockname()[1]
        env: dict[str, str] = {}
        if backend == "postgres":
            schema = await stack.enter_async_context(postgres_schema())
            env = {"HEALTHAGENT_DATABASE_URL": POSTGRES_DSN, "HEALTHAGENT_DATABASE_SCHEMA": schema}
        base = f"http://127.0.0.1:{upstream.port}"
        failures: list[grpc.aio.AioRpcError] = []

        async def fails(call: Awaitable[object]) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call
            failures.append(failure.value)

        async def chat(stub: Any, message: str, user: str) -> None:
            async for _ in stub.Chat(pb.ChatRequest(message=message, user=user)):
                pass

        hosted = await start_service(
            **env,
            HEALTHAGENT_UPSTREAM="chatkit",
            OPENAI_API_KEY="sk-x",
            OPENAI_WORKFLOW_ID="wf",
            OPENAI_BASE_URL=f"{base}/v1",
            OPENAI_REALTIME_URL=f"ws://127.0.0.1:{socket_port}/realtime",
            HEALTHAGENT_REALTIME_WARM_SOCKETS="0",
        )
        for user in ("nul-session", "nul-secret", "surrogate-secret"):
            await fails(hosted.stub.MintSession(pb.MintSessionRequest(user=user)))
        await fails(
            hosted.stub.MintSession(
                pb.MintSessionRequest(
                    user="rt", kind=pb.SESSION_KIND_REALTIME, ttl_seconds=_BAD_SESSION_TTL
                )
            )
        )
        self_hosted = await start_service(**env, HEALTHAGENT_CHATKIT_URL=f"{base}/ck")
        for message in ("nul thread", "surrogate thread", "long thread", "newline thread"):
            await fails(chat(self_hosted.stub, message, "thready"))
        await fails(chat(self_hosted.stub, "nul call", "caller"))
        realtime = await start_service(
            **env,
            HEALTHAGENT_UPSTREAM="realtime",
            OPENAI_API_KEY="sk-x",
            OPENAI_BASE_URL=f"{base}/v1",
            OPENAI_REALTIME_URL=f"ws://127.0.0.1:{socket_port}/realtime",
            HEALTHAGENT_REALTIME_WARM_SOCKETS="0",
        )
        await fails(chat(realtime.stub, "hi", "rt"))
        details = [status_details(failure) for failure in failures]
        assert [(d.code, d.reason) for d in details] == [
            (UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR")
        ] * 10, [d.message for d in details]
        assert all(d.retry_delay_seconds is not None for d in details)
        # a thread never named is not recorded; the tool call's turn is, whole, without it
        for stub, user in ((self_hosted.stub, "thready"), (realtime.stub, "rt")):
            page = await stub.ListConversations(pb.ListConversationsRequest(user=user))
            assert not page.conversations
        stored = await self_hosted.stub.GetConversation(
            pb.GetConversationRequest(user="caller", conversation_id="thr_call")
        )
        answer = stored.conversation.messages[-1]
        assert (answer.status, answer.error_reason, list(answer.tool_calls)) == (
            pb.MESSAGE_STATUS_FAILED,
            "UPSTREAM_PROTOCOL_ERROR",
            [],
        )
