"""The OpenAI model APIs an Agents SDK agent calls, emulated: `POST /v1/responses` and
`POST /v1/chat/completions`, streamed (SSE) or not, in the official shapes.

One planning path serves both: the request's input becomes (role, text) pairs, the reply is
`script.plan_reply` of the last user message's text (or of the tool results when the input ends
with them), so the same trigger phrases steer ChatKit turns and model turns. A planned reply is
its text and then, for `[tool]` and `[call NAME {args}]`, function calls to the tools that the
request offers. Each request is recorded (`ModelRequestRecord`) for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from healthagent_service.emulator.chatkit_wire import error_envelope
from healthagent_service.emulator.http_server import DropConnection, HttpRequest, HttpResponse
from healthagent_service.emulator.script import (
    RATE_LIMIT_RETRY_AFTER_SECONDS,
    SAME_IDS_TRIGGER,
    Reply,
    plan_reply,
    stamp_text,
)

if TYPE_CHECKING:
    from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator

RESPONSES = "responses"
CHAT_COMPLETIONS = "chat.completions"
MAX_RECORDS = 1000
# GET /_emulator/stats carries only the latest few (benchmarks poll it in a loop);
# GET /_emulator/model_requests carries all that are kept.
STATS_RECORDS = 20
MODEL_ERROR_MESSAGE = "Emulated model error."
# Request fields a Response object repeats.
_ECHOED = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "store",
    "temperature",
    "text",
    "tools",
    "top_p",
)
_DELTA_HEAD = (
    b"event: response.output_text.delta\ndata: "
    b'{"type":"response.output_text.delta","sequence_number":'
)
_JSON_HEADERS = [("content-type", "application/json")]
_TOKEN_LIMIT = {"reason": "max_output_tokens"}  # a Response's incomplete_details at `[length]`
_SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]

# What a request came to, and how it ended (`ModelRequestRecord.outcome`).
OPEN = "open"  # still streaming
COMPLETED = "completed"  # the whole answer, with its terminal event (`[DONE]` for chat)
FAILED = "failed"  # `[error]`: response.failed / an error chunk / a failed or 500 answer
REJECTED = "rejected"  # an HTTP error status and no body (`status` says which)
DROPPED = "dropped"  # `[drop]`: the emulator cut the connection
NO_END = "noend"  # `[noend]`: the body ended cleanly without the terminal event
INCOMPLETE = "incomplete"  # `[length]`: stopped at the output token limit, and said so
CLIENT_CLOSED = "client_closed"  # the client left before the body ended (`client_left_at`)
INTERRUPTED = "interrupted"  # the emulator shut down mid-stream


@dataclass(slots=True)
class ModelRequestRecord:
    """One request to a model API, as the emulator saw and answered it.

    `input` is the conversation as (role, text) pairs: `system` for Responses `instructions`
    and system messages, `user`, `assistant`, `developer`; `tool_call` with text
    `"NAME ARGUMENTS_JSON"` for each function call the model made earlier; `tool` with the
    output text for each tool result. `output` uses the same pairs for the answer.
    Times are `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process).
    """

    api: str  # RESPONSES or CHAT_COMPLETIONS
    model: str
    stream: bool
    input: list[tuple[str, str]]
    tools: list[str]  # offered tools: function names, other tools by their type
    status: int = 200
    outcome: str = OPEN
    response_id: str = ""
    output: list[tuple[str, str]] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    client_left_at: float | None = None  # when the emulator noticed the client leave

    def to_json(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "model": self.model,
            "stream": self.stream,
            "input": [list(pair) for pair in self.input],
            "tools": self.tools,
            "status": self.status,
            "outcome": self.outcome,
            "response_id": self.response_id,
            "output": [list(pair) for pair in self.output],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "client_left_at": self.client_left_at,
        }


@dataclass(slots=True)
class ModelInput:
    """What a request asks for, whichever API it came to."""

    model: str
    stream: bool
    input: list[tuple[str, str]]
    tools: list[str]
    functions: frozenset[str]  # the function tools the model may call
    last_user_text: str | None
    tool_results: list[Any] | None  # the tool outputs the input ends with, if it does
    tool_choice: Any
    include_usage: bool = False  # chat completions' stream_options.include_usage
    settings: dict[str, Any] = field(default_factory=dict)  # what a Response echoes back


@dataclass(frozen=True, slots=True)
class ModelTurn:
    """The planned answer: the scripted reply, the calls it makes, and its usage."""

    reply: Reply
    calls: tuple[tuple[str, str], ...]  # (name, JSON arguments), offered tools only
    input_tokens: int
    # `[sameids]`: Responses item ids numbered by output index (`msg_0`, `fc_1`, ...), the same
    # every turn, as some Responses-compatible servers number them
    same_ids: bool = False

    @property
    def output_tokens(self) -> int:
        """One per text delta and one per call's arguments."""
        return len(self.reply.chunks) + len(self.calls)


def plan_turn(request: ModelInput) -> ModelTurn:
    """The answer to `request`: `script.plan_reply`, the one planner of every emulated reply."""
    if request.tool_results is not None:
        results = request.tool_results
        reply = plan_reply(None, results[0] if len(results) == 1 else results, has_tool_result=True)
    else:
        reply = plan_reply(request.last_user_text)
    calls: tuple[tuple[str, str], ...] = ()
    if request.tool_choice != "none":
        calls = tuple(call for call in reply.function_calls if call[0] in request.functions)
    words = sum(len(text.split()) for _, text in request.input)
    # read from the last user message even after tool results: the ids are the server's
    # habit for the whole turn, not part of the reply
    same_ids = SAME_IDS_TRIGGER in (request.last_user_text or "").lower()
    return ModelTurn(reply, calls, words, same_ids)


def _failure(reply: Reply) -> tuple[str, int] | None:
    """The way the stream ends early, and after how many deltas; ChatKit's precedence."""
    for kind, after in (
        (FAILED, reply.fail_after),
        (NO_END, reply.end_after),
        (INCOMPLETE, reply.length_after),
    ):
        if after is not None and after < len(reply.chunks):
            return kind, after
    if reply.drop_after is not None and reply.drop_after < len(reply.chunks):
        return DROPPED, reply.drop_after
    return None


class ModelApi:
    """Serves the model endpoints for `owner`, reading its config and stats per request (tests
    replace `owner.config`)."""

    def __init__(self, owner: ChatKitEmulator) -> None:
        self._owner = owner
        self.requests: deque[ModelRequestRecord] = deque(maxlen=MAX_RECORDS)

    def records_json(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The latest records, oldest first."""
        records = list(self.requests)
        return [r.to_json() for r in (records if limit is None else records[-limit:])]

    async def responses(self, request: HttpRequest) -> HttpResponse:
        """`POST /v1/responses`."""
        return await self._serve(request, RESPONSES)

    async def chat_completions(self, request: HttpRequest) -> HttpResponse:
        """`POST /v1/chat/completions`."""
        return await self._serve(request, CHAT_COMPLETIONS)

    async def _serve(self, request: HttpRequest, api: str) -> HttpResponse:
        stats = self._owner.stats
        stats.model_requests += 1
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not secrets.compare_digest(
            auth[7:].encode(), self._owner.config.api_key.encode()
        ):
            record = ModelRequestRecord(api, "", False, [], [])
            self.requests.append(record)
            self._record_rejected(record, 401)
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._invalid(api, "We could not parse the JSON body of your request.", None)
        if not isinstance(body, dict):
            return self._invalid(api, "The request body must be a JSON object.", None)
        parsed = _parse_responses(body) if api == RESPONSES else _parse_chat(body)
        if isinstance(parsed, str):
            return self._invalid(api, parsed, body)
        turn = plan_turn(parsed)
        record = ModelRequestRecord(
            api,
            parsed.model,
            parsed.stream,
            parsed.input,
            parsed.tools,
            input_tokens=turn.input_tokens,
        )
        self.requests.append(record)
        reply = turn.reply
        if reply.http_status is not None and reply.http_status >= 400:
            status = reply.http_status
            self._record_rejected(record, status)
            response = _error(
                status,
                f"Emulated HTTP {status}.",
                "rate_limit_exceeded" if status == 429 else None,
                type_="requests" if status == 429 else _error_type(status),
            )
            if status == 429:
                response.headers.append(("retry-after", str(RATE_LIMIT_RETRY_AFTER_SECONDS)))
            return response
        request_id = ("x-request-id", f"req_{secrets.token_hex(16)}")
        if not parsed.stream:
            return await self._answer(api, parsed, turn, record, request_id)
        stream = (
            self._responses_stream(parsed, turn, record)
            if api == RESPONSES
            else self._chat_stream(parsed, turn, record)
        )
        return HttpResponse(
            200,
            [*_SSE_HEADERS, request_id],
            stream=stream,
            on_client_left=lambda at: self._client_left(record, at),
        )

    def _invalid(self, api: str, message: str, body: dict[str, Any] | None) -> HttpResponse:
        model = body.get("model") if body is not None else None
        record = ModelRequestRecord(api, model if isinstance(model, str) else "", False, [], [])
        self.requests.append(record)
        self._record_rejected(record, 400)
        return _error(400, message, "invalid_request")

    def _record_rejected(self, record: ModelRequestRecord, status: int) -> None:
        record.status = status
        record.outcome = REJECTED
        record.ended_at = time.monotonic()
        self._owner.stats.model_requests_rejected += 1

    def _client_left(self, record: ModelRequestRecord, at: float) -> None:
        record.client_left_at = at
        if record.outcome in (OPEN, INTERRUPTED):
            record.outcome = CLIENT_CLOSED
            record.ended_at = record.ended_at or at  # a body that never started has no end
        self._owner.stats.model_streams_disconnected += 1

    def _end(self, record: ModelRequestRecord, outcome: str) -> None:
        record.outcome = outcome
        record.ended_at = time.monotonic()
        if outcome == COMPLETED and record.stream:
            self._owner.stats.model_streams_completed += 1

    async def _deltas(self, reply: Reply, record: ModelRequestRecord) -> AsyncGenerator[str, None]:
        """The reply's text deltas, paced, up to where `_failure` ends the stream early."""
        config = self._owner.config
        stats = self._owner.stats
        delay = config.chunk_delay_seconds if reply.pace_ms is None else reply.pace_ms / 1000
        failure = _failure(reply)
        for index, chunk in enumerate(reply.chunks):
            if failure is not None and index == failure[1] and failure[0] != DROPPED:
                return
            if index == reply.stall_after:
                await asyncio.sleep(config.slow_first_byte_seconds)
            if failure is not None and index == failure[1]:
                return
            if delay:
                await asyncio.sleep(delay)
            record.output_tokens += 1
            stats.chunks_sent += 1
            yield stamp_text(time.monotonic_ns()) if reply.stamp else chunk

    # -- Responses -------------------------------------------------------------------------

    async def _responses_stream(
        self, request: ModelInput, turn: ModelTurn, record: ModelRequestRecord
    ) -> AsyncGenerator[bytes, None]:
        stats = self._owner.stats
        stats.streams_open += 1
        reply = turn.reply
        sequence = itertools.count()
        response_id = record.response_id = f"resp_{secrets.token_hex(24)}"
        created_at = int(time.time())

        def event(type_: str, **fields: Any) -> bytes:
            payload = {"type": type_, "sequence_number": next(sequence), **fields}
            return b"event: %b\ndata: %b\n\n" % (type_.encode(), _dumps(payload))

        def response(status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return _response_object(request, response_id, created_at, status, output, **extra)

        try:
            if reply.slow_first_byte:
                await asyncio.sleep(self._owner.config.slow_first_byte_seconds)
            yield event("response.created", response=response("in_progress", []))
            yield event("response.in_progress", response=response("in_progress", []))
            item_id = _item_id("msg", 0, turn)
            yield event(
                "response.output_item.added",
                output_index=0,
                item=_message_item(item_id, None, "in_progress"),
            )
            location = {"item_id": item_id, "output_index": 0, "content_index": 0}
            yield event("response.content_part.added", **location, part=_output_text(""))
            # The per-delta hot path: only the sequence number and the delta are encoded.
            head = _DELTA_HEAD
            middle = (
                b',"item_id":"%b","output_index":0,"content_index":0,"delta":' % item_id.encode()
            )
            texts: list[str] = []
            # aclosing: when the client leaves, the deltas end with this stream, not at GC time
            async with aclosing(self._deltas(reply, record)) as deltas:
                async for text in deltas:
                    texts.append(text)
                    frame = (head, next(sequence), middle, _dumps(text))
                    yield b'%b%d%b%b,"logprobs":[]}\n\n' % frame
            text = "".join(texts)
            failure = _failure(reply)
            if failure is not None:
                record.output = [("assistant", text)]
                if failure[0] == DROPPED:
                    self._end(record, DROPPED)
                    raise DropConnection
                if failure[0] == FAILED:
                    self._end(record, FAILED)
                    partial = _message_item(item_id, text, "incomplete")
                    error = {"code": "server_error", "message": MODEL_ERROR_MESSAGE}
                    yield event(
                        "response.failed", response=response("failed", [partial], error=error)
                    )
                    return
                if failure[0] == INCOMPLETE:
                    self._end(record, INCOMPLETE)
                    partial = _message_item(item_id, text, "incomplete")
                    stopped = response("incomplete", [partial], incomplete_details=_TOKEN_LIMIT)
                    yield event("response.incomplete", response=stopped)
                    return
                self._end(record, NO_END)
                return
            yield event("response.output_text.done", **location, text=text, logprobs=[])
            yield event("response.content_part.done", **location, part=_output_text(text))
            message = _message_item(item_id, text, "completed")
            yield event("response.output_item.done", output_index=0, item=message)
            output = [message]
            for index, (name, arguments) in enumerate(turn.calls, start=1):
                call_id = _item_id("fc", index, turn)
                call = _call_item(call_id, f"call_{secrets.token_hex(16)}", name, "", "in_progress")
                yield event("response.output_item.added", output_index=index, item=call)
                at = {"item_id": call_id, "output_index": index}
                yield event("response.function_call_arguments.delta", **at, delta=arguments)
                yield event(
                    "response.function_call_arguments.done", **at, name=name, arguments=arguments
                )
                call = {**call, "arguments": arguments, "status": "completed"}
                yield event("response.output_item.done", output_index=index, item=call)
                output.append(call)
            record.output = _output_pairs(text, turn.calls)
            record.output_tokens = turn.output_tokens
            usage = _responses_usage(turn)
            done = response("completed", output, usage=usage, completed_at=int(time.time()))
            yield event("response.completed", response=done)
            self._end(record, COMPLETED)
        finally:
            self._stream_closed(record)

    def _stream_closed(self, record: ModelRequestRecord) -> None:
        """A streamed answer's body ended, however: count it, and name an unfinished one."""
        stats = self._owner.stats
        stats.streams_open -= 1
        if record.outcome == OPEN:
            self._end(record, INTERRUPTED)
        if record.outcome == COMPLETED:
            stats.streams_completed += 1

    # -- Chat Completions ------------------------------------------------------------------

    async def _chat_stream(
        self, request: ModelInput, turn: ModelTurn, record: ModelRequestRecord
    ) -> AsyncGenerator[bytes, None]:
        stats = self._owner.stats
        stats.streams_open += 1
        reply = turn.reply
        completion_id = record.response_id = f"chatcmpl-{secrets.token_hex(16)}"
        created = int(time.time())
        usage_field = {"usage": None} if request.include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _chat_chunk(completion_id, created, request.model, [choice], **usage_field)

        try:
            if reply.slow_first_byte:
                await asyncio.sleep(self._owner.config.slow_first_byte_seconds)
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            head, tail = chunk({"content": "\x00"}).split(_dumps("\x00"))
            texts: list[str] = []
            async with aclosing(self._deltas(reply, record)) as deltas:
                async for text in deltas:
                    texts.append(text)
                    yield head + _dumps(text) + tail
            text = "".join(texts)
            failure = _failure(reply)
            if failure is not None:
                record.output = [("assistant", text)]
                if failure[0] == DROPPED:
                    self._end(record, DROPPED)
                    raise DropConnection
                if failure[0] == FAILED:
                    self._end(record, FAILED)
                    error = {
                        "message": MODEL_ERROR_MESSAGE,
                        "type": "server_error",
                        "param": None,
                        "code": "server_error",
                    }
                    yield b"data: %b\n\n" % _dumps({"error": error})
                    return
                if failure[0] == INCOMPLETE:
                    self._end(record, INCOMPLETE)
                    yield chunk({}, "length")
                    if request.include_usage:
                        yield _chat_chunk(
                            completion_id, created, request.model, [], usage=_chat_usage(turn)
                        )
                    yield b"data: [DONE]\n\n"
                    return
                self._end(record, NO_END)
                return
            for index, (name, arguments) in enumerate(turn.calls):
                call = {
                    "index": index,
                    "id": f"call_{secrets.token_hex(16)}",
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                yield chunk({"tool_calls": [call]})
                yield chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
                )
            yield chunk({}, "tool_calls" if turn.calls else "stop")
            if request.include_usage:
                yield _chat_chunk(
                    completion_id, created, request.model, [], usage=_chat_usage(turn)
                )
            yield b"data: [DONE]\n\n"
            record.output = _output_pairs(text, turn.calls)
            record.output_tokens = turn.output_tokens
            self._end(record, COMPLETED)
        finally:
            self._stream_closed(record)

    # -- non-streaming ---------------------------------------------------------------------

    async def _answer(
        self,
        api: str,
        request: ModelInput,
        turn: ModelTurn,
        record: ModelRequestRecord,
        request_id: tuple[str, str],
    ) -> HttpResponse:
        reply = turn.reply
        if reply.slow_first_byte or reply.stall_after is not None:
            await asyncio.sleep(self._owner.config.slow_first_byte_seconds)
        failure = _failure(reply)
        headers = [*_JSON_HEADERS, request_id]
        if failure is not None and failure[0] == DROPPED:
            self._end(record, DROPPED)
            raise DropConnection  # no response at all
        text = reply.text
        created = int(time.time())
        if failure is not None and failure[0] == FAILED:
            self._end(record, FAILED)
            if api == CHAT_COMPLETIONS:  # chat completions has no failed status: a 500
                record.status = 500
                return _error(500, MODEL_ERROR_MESSAGE, "server_error", type_="server_error")
            response_id = record.response_id = f"resp_{secrets.token_hex(24)}"
            error = {"code": "server_error", "message": MODEL_ERROR_MESSAGE}
            failed = _response_object(request, response_id, created, "failed", [], error=error)
            return HttpResponse(200, headers, _dumps(failed))
        # `[noend]` has no meaning without a stream: the answer is whole; at `[length]` it
        # stops at the token limit, before any call
        stopped = failure is not None and failure[0] == INCOMPLETE
        if failure is not None and stopped:
            text = "".join(reply.chunks[: failure[1]])
            turn = ModelTurn(reply, (), turn.input_tokens, turn.same_ids)
            record.output_tokens = failure[1]
        else:
            record.output_tokens = turn.output_tokens
        record.output = _output_pairs(text, turn.calls)
        self._end(record, INCOMPLETE if stopped else COMPLETED)
        if api == RESPONSES:
            response_id = record.response_id = f"resp_{secrets.token_hex(24)}"
            status = "incomplete" if stopped else "completed"
            output = [_message_item(_item_id("msg", 0, turn), text, status)]
            for index, (name, arguments) in enumerate(turn.calls, start=1):
                call_id = f"call_{secrets.token_hex(16)}"
                item_id = _item_id("fc", index, turn)
                output.append(_call_item(item_id, call_id, name, arguments, "completed"))
            answer = _response_object(
                request,
                response_id,
                created,
                status,
                output,
                usage=_responses_usage(turn),
                completed_at=None if stopped else created,
                incomplete_details=_TOKEN_LIMIT if stopped else None,
            )
            return HttpResponse(200, headers, _dumps(answer))
        completion_id = record.response_id = f"chatcmpl-{secrets.token_hex(16)}"
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": [],
        }
        if turn.calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{secrets.token_hex(16)}",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
                for name, arguments in turn.calls
            ]
        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "length"
                    if stopped
                    else ("tool_calls" if turn.calls else "stop"),
                }
            ],
            "usage": _chat_usage(turn),
            "service_tier": "default",
            "system_fingerprint": None,
        }
        return HttpResponse(200, headers, _dumps(completion))


# -- parsing -------------------------------------------------------------------------------


def _parse_responses(body: dict[str, Any]) -> ModelInput | str:
    """The request, or what is wrong with it."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "Missing required parameter: 'model'."
    raw = body.get("input", [])
    items: list[Any] = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return "Invalid 'input': expected a string or an array of input items."
    pairs: list[tuple[str, str]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        pairs.append(("system", instructions))
    last_user: str | None = None
    trailing: list[Any] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call_output":
            text = _content_text(item.get("output"))
            pairs.append(("tool", text))
            trailing.append(_tool_value(text))
            continue
        trailing = []
        if kind == "message":
            role = str(item.get("role", "user"))
            text = _content_text(item.get("content"))
            pairs.append((role, text))
            if role == "user":
                last_user = text
        elif kind == "function_call":
            pairs.append(("tool_call", f"{item.get('name')} {item.get('arguments')}"))
        else:  # reasoning and the rest: the type, with any text they carry
            pairs.append((str(kind), _content_text(item.get("content") or item.get("summary"))))
    tools, functions = _offered(body.get("tools"), chat=False)
    return ModelInput(
        model=model,
        stream=body.get("stream") is True,
        input=pairs,
        tools=tools,
        functions=functions,
        last_user_text=last_user,
        tool_results=trailing or None,
        tool_choice=body.get("tool_choice", "auto"),
        settings={key: body[key] for key in _ECHOED if body.get(key) is not None},
    )


def _parse_chat(body: dict[str, Any]) -> ModelInput | str:
    """The request, or what is wrong with it."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "Missing required parameter: 'model'."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "Missing required parameter: 'messages'."
    if not all(isinstance(message, dict) for message in messages):
        return "Invalid 'messages': expected an array of message objects."
    pairs: list[tuple[str, str]] = []
    last_user: str | None = None
    trailing: list[Any] = []
    for message in messages:
        role = str(message.get("role"))
        text = _content_text(message.get("content"))
        if role == "tool":
            pairs.append(("tool", text))
            trailing.append(_tool_value(text))
            continue
        trailing = []
        calls = message.get("tool_calls") if role == "assistant" else None
        if text or not calls:
            pairs.append((role, text))
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                pairs.append(("tool_call", f"{function.get('name')} {function.get('arguments')}"))
        if role == "user":
            last_user = text
    tools, functions = _offered(body.get("tools"), chat=True)
    options = body.get("stream_options")
    return ModelInput(
        model=model,
        stream=body.get("stream") is True,
        input=pairs,
        tools=tools,
        functions=functions,
        last_user_text=last_user,
        tool_results=trailing or None,
        tool_choice=body.get("tool_choice", "auto"),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def _offered(tools: Any, *, chat: bool) -> tuple[list[str], frozenset[str]]:
    """Every offered tool's name (its type when it has none), and the function tools."""
    names: list[str] = []
    functions: set[str] = set()
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        kind = str(tool.get("type"))
        spec = tool.get("function") if chat else tool
        name = spec.get("name") if isinstance(spec, dict) else None
        if kind == "function" and isinstance(name, str):
            names.append(name)
            functions.add(name)
        else:
            names.append(name if isinstance(name, str) else kind)
    return names, frozenset(functions)


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its parts, one per line."""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                texts.append(text)
    return "\n".join(texts)


def _tool_value(text: str) -> Any:
    """A tool's output as the reply quotes it: its JSON value when it is JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- wire shapes ---------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def _error(
    status: int, message: str, code: str | None, *, type_: str = "invalid_request_error"
) -> HttpResponse:
    return HttpResponse(
        status, list(_JSON_HEADERS), error_envelope(message, code=code, type_=type_)
    )


def _item_id(prefix: str, output_index: int, turn: ModelTurn) -> str:
    """A Responses output item's id: random, or numbered by its place under `[sameids]`."""
    if turn.same_ids:
        return f"{prefix}_{output_index}"
    return f"{prefix}_{secrets.token_hex(24)}"


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def _output_pairs(text: str, calls: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [("assistant", text), *(("tool_call", f"{name} {args}") for name, args in calls)]


def _response_object(
    request: ModelInput,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    *,
    error: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    completed_at: int | None = None,
    incomplete_details: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Response object; the request's own settings are echoed back as the API does."""
    settings = request.settings
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": settings.get("instructions"),
        "max_output_tokens": settings.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": request.model,
        "output": output,
        "parallel_tool_calls": settings.get("parallel_tool_calls", True),
        "previous_response_id": settings.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": settings.get("store", True),
        "temperature": settings.get("temperature", 1.0),
        "text": settings.get("text", {"format": {"type": "text"}, "verbosity": "medium"}),
        "tool_choice": request.tool_choice,
        "tools": settings.get("tools", []),
        "top_logprobs": 0,
        "top_p": settings.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": settings.get("metadata") or {},
    }


def _responses_usage(turn: ModelTurn) -> dict[str, Any]:
    return {
        "input_tokens": turn.input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": turn.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": turn.input_tokens + turn.output_tokens,
    }


def _chat_usage(turn: ModelTurn) -> dict[str, Any]:
    return {
        "prompt_tokens": turn.input_tokens,
        "completion_tokens": turn.output_tokens,
        "total_tokens": turn.input_tokens + turn.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_chunk(
    completion_id: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> bytes:
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": None,
        "choices": choices,
        **extra,
    }
    return b"data: %b\n\n" % _dumps(chunk)
