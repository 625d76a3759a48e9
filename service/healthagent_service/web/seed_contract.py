"""The seeds' HTTP contract at `POST /functions/v1/health-agent`, so an app written for the
Supabase Edge Function it replaces works by changing only its base URL.

- `{message, user, deviceId?, stream: true, conversationId?}` (or `toolOutput {callId, output}`
  instead of `message`): a `Chat`, as Server-Sent Events named as the seed names them: `session`
  (`sessionId`, `userId`, `workflowId`, `conversationId`), `chunk` (`text`, `sessionId`),
  `text_done`, `tool_call`, `notice`, `response_done` (`sessionId`, `response`), then `done`.
  A failure after the stream began ends with `event: error` (`message`, `code`, `reason`,
  `retryAfter` when known) and no `done`; before it began, an HTTP status and a JSON body.
- `{message, user, stream: false}`: seed 000's session answer (a ChatKit `MintSession`).
- `{device_id}` alone: seed 001's mint answer (a Realtime `MintSession` for that device).

Every call goes through the gRPC server over its private socket, with the caller's
`Authorization` and `x-request-id` as metadata, like any other client's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring  # what json.dumps uses with ensure_ascii=False
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.web.forwarding import ForwardedCall, ForwardingChannel

# how long the first event may take before the 200 and heartbeats go out: refusals (auth,
# validation, limits) come at once; an upstream's slow first token must not let proxies and load
# balancers drop a silent stream (nginx and ALB at 60 s)
FIRST_EVENT_WAIT_SECONDS = 2.0
HEARTBEAT = b": ping\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# google.api's HTTP mapping of gRPC codes (google/rpc/code.proto)
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_FORWARDED_HEADERS = ("authorization", "x-request-id")
_CHAT = "/healthagent.v1.HealthAgent/Chat"
_MINT_SESSION = "/healthagent.v1.HealthAgent/MintSession"


class ContractError(Exception):
    """A request the contract cannot take: answered with this HTTP status and JSON body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error"))
        self.status = status
        self.body = body


def _invalid(field: str, description: str) -> ContractError:
    return ContractError(
        400,
        {
            "success": False,
            "error": f"invalid request: {field}: {description}",
            "code": "INVALID_ARGUMENT",
            "reason": "INVALID_REQUEST",
            "violations": [{"field": field, "description": description}],
        },
    )


def error_body(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """A failed call as the contract's error JSON: the message, the gRPC code's name, and from
    the `google.rpc` details the reason, `retryAfter` seconds and field violations."""
    body: dict[str, Any] = {"message": error.details() or "", "code": error.code().name}
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        status = status_pb2.Status.FromString(raw)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                body["reason"] = info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                body["retryAfter"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                body["violations"] = [
                    {"field": v.field, "description": v.description} for v in bad.field_violations
                ]
    return body


def _http_error(error: grpc.aio.AioRpcError) -> ContractError:
    body = error_body(error)
    return ContractError(
        HTTP_STATUS.get(error.code(), 500),
        {"success": False, "error": body.pop("message"), **body},
    )


def _event(name: str, data: dict[str, Any], event_id: int) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event_id}\nevent: {name}\ndata: {payload}\n\n".encode()


def _chunk_end(session_id: str) -> bytes:
    return f',"sessionId":{encode_basestring(session_id)}}}\n\n'.encode()


def _string(body: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise _invalid(name, "must be a string")
            return value
    return None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request (an empty body is `{}`, as the seed's function took it)."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _invalid("body", "is not JSON") from None
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    return body


class SeedContract:
    """Answers the seeds' requests with gRPC calls through the listener's `ForwardingChannel`."""

    def __init__(self, channel: ForwardingChannel) -> None:
        self._channel = channel

    async def answer(
        self, body: dict[str, Any], headers: Mapping[str, str]
    ) -> dict[str, Any] | AsyncGenerator[bytes, None]:
        """A JSON answer, or the SSE body of a streamed Chat. Raises `ContractError`."""
        metadata = tuple((name, headers[name]) for name in _FORWARDED_HEADERS if headers.get(name))
        message = _string(body, "message")
        tool_output = body.get("toolOutput")
        device = _string(body, "device_id", "deviceId") or ""
        if message is None and tool_output is None:
            if not device:
                raise _invalid("message", "required (or device_id alone, to mint a secret)")
            return await self._mint_realtime(device, metadata)
        user = _string(body, "user", "userId") or device
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _invalid("stream", "must be true or false")
        if not stream:
            return await self._mint_chatkit(user, device, metadata)
        request = pb.ChatRequest(user=user, device_id=device)
        conversation_id = _string(body, "conversationId", "conversation_id")
        if conversation_id is not None:
            request.conversation_id = conversation_id
        if tool_output is not None:
            request.tool_output.CopyFrom(_tool_output(tool_output))
        else:
            request.message = message or ""
        return await self._chat(request, metadata)

    async def _mint_realtime(
        self, device: str, metadata: tuple[tuple[str, str], ...]
    ) -> dict[str, Any]:
        request = pb.MintSessionRequest(
            user=device, device_id=device, kind=pb.SESSION_KIND_REALTIME
        )
        minted = await self._mint(request, metadata)
        return {
            "client_secret": minted.client_secret,
            "session": {
                "id": minted.session.id,
                "expires_at": _iso(minted.session.expires_at.seconds),
                "ttl_seconds": minted.session.ttl_seconds,
            },
            "workflow_id": minted.workflow_id,
            "user": minted.user,
        }

    async def _mint_chatkit(
        self, user: str, device: str, metadata: tuple[tuple[str, str], ...]
    ) -> dict[str, Any]:
        request = pb.MintSessionRequest(user=user, device_id=device, kind=pb.SESSION_KIND_CHATKIT)
        minted = await self._mint(request, metadata)
        return {
            "success": True,
            "session": {
                "id": minted.session.id,
                "client_secret": minted.client_secret,
                "user": minted.user,
                "workflow": {"id": minted.workflow_id},
                "expires_at": _iso(minted.session.expires_at.seconds),
            },
            "message": "Session created successfully",
        }

    async def _mint(
        self, request: pb.MintSessionRequest, metadata: tuple[tuple[str, str], ...]
    ) -> pb.MintSessionResponse:
        try:
            answer = await self._channel.unary(_MINT_SESSION, request.SerializeToString(), metadata)
        except grpc.aio.AioRpcError as error:
            raise _http_error(error) from None
        return pb.MintSessionResponse.FromString(answer)

    async def _chat(
        self, request: pb.ChatRequest, metadata: tuple[tuple[str, str], ...]
    ) -> AsyncGenerator[bytes, None]:
        call = await self._channel.call(_CHAT, request.SerializeToString(), metadata)
        first = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({first}, timeout=FIRST_EVENT_WAIT_SECONDS)
        if done:
            try:
                first.result()
            except grpc.aio.AioRpcError as error:
                raise _http_error(error) from None
        return _sse(call, first)


async def _sse(
    call: ForwardedCall, first: asyncio.Future[bytes | None]
) -> AsyncGenerator[bytes, None]:
    """The SSE body: the seed's events as the call yields them, read in the writer's own task
    (a reader task and a queue between them cost a task switch and a loop turn a chunk, 3 ms
    at p50 with 100 streams; docs/decisions/0008-http-listener-loopback-hop.md). Nothing is
    read ahead of a slow HTTP client: the call's flow control reaches the service, whose stall
    limit applies. Heartbeats are the writer's (`listener.write_event_stream`)."""
    writer = _SeedEvents()
    try:
        try:
            message = await first
            while message is not None:
                for piece in writer.translate(pb.ChatResponse.FromString(message)):
                    yield piece
                message = await call.read()
            yield writer.done()
        except grpc.aio.AioRpcError as error:
            yield writer.error(error)
    finally:
        # the caller left, or the stream ended: close the call, which closes the upstream turn
        first.cancel()
        call.cancel()


class _SeedEvents:
    """gRPC `ChatResponse`s as the seed's named SSE events."""

    def __init__(self) -> None:
        self._session_id = ""
        self._conversation_id = ""
        self._next_id = 0
        self._chunk_end = _chunk_end("")

    def _chunk(self, text: str) -> bytes:
        """A `chunk` event, as `_event` writes it, from parts made once a stream: it is nearly
        every event, and a dict through `json.dumps` cost it 7.5 us where this costs 1."""
        self._next_id += 1
        return b'id: %d\nevent: chunk\ndata: {"text":%s%s' % (
            self._next_id,
            encode_basestring(text).encode(),
            self._chunk_end,
        )

    def _emit(self, name: str, data: dict[str, Any]) -> bytes:
        self._next_id += 1
        return _event(name, data, self._next_id)

    def translate(self, event: pb.ChatResponse) -> list[bytes]:
        kind = event.WhichOneof("event")
        if kind == "session":
            session = event.session
            self._session_id = session.session_id or session.conversation_id
            self._conversation_id = session.conversation_id
            self._chunk_end = _chunk_end(self._session_id)
            return [
                self._emit(
                    "session",
                    {
                        "sessionId": self._session_id,
                        "userId": session.user,
                        "workflowId": session.workflow_id,
                        "conversationId": session.conversation_id,
                    },
                )
            ]
        if kind == "chunk":
            return [self._chunk(event.chunk.text)]
        if kind == "text_done":
            return [
                self._emit(
                    "text_done", {"text": event.text_done.text, "sessionId": self._session_id}
                )
            ]
        if kind == "tool_call":
            call = event.tool_call
            return [
                self._emit(
                    "tool_call",
                    {
                        "callId": call.call_id,
                        "name": call.name,
                        "arguments": _arguments(call.arguments_json),
                        "sessionId": self._session_id,
                        "conversationId": self._conversation_id,
                    },
                )
            ]
        if kind == "notice":
            notice = event.notice
            return [
                self._emit(
                    "notice",
                    {
                        "level": pb.NoticeLevel.Name(notice.level)
                        .removeprefix("NOTICE_LEVEL_")
                        .lower(),
                        "title": notice.title,
                        "message": notice.message,
                        "sessionId": self._session_id,
                    },
                )
            ]
        if kind == "response_done":
            response = json_format.MessageToDict(event.response_done)
            response.setdefault("text", "")
            response["conversationId"] = self._conversation_id
            return [
                self._emit("response_done", {"sessionId": self._session_id, "response": response})
            ]
        return []  # progress and passthrough events have no place in the seed's contract

    def done(self) -> bytes:
        return self._emit("done", {"sessionId": self._session_id})

    def error(self, error: grpc.aio.AioRpcError) -> bytes:
        return self._emit("error", {**error_body(error), "sessionId": self._session_id})


def _arguments(arguments_json: str) -> Any:
    """A tool call's arguments as JSON, or as the model's text when that is not JSON (the
    Realtime model's own, passed through)."""
    try:
        return json.loads(arguments_json or "{}")
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's limit
        return arguments_json


def _tool_output(value: Any) -> pb.ToolOutput:
    if not isinstance(value, dict) or not isinstance(value.get("callId"), str):
        raise _invalid("toolOutput", 'must be {"callId": "...", "output": <JSON>}')
    return pb.ToolOutput(
        call_id=value["callId"], output_json=json.dumps(value.get("output"), separators=(",", ":"))
    )


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
