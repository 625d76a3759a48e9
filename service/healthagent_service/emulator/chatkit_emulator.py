"""The ChatKit side of the emulator: sessions, cancel, and the conversation endpoint.

Routes (under the `/v1` prefix of `OPENAI_BASE_URL`):
- `POST /v1/chatkit/sessions`, `POST /v1/chatkit/sessions/{id}/cancel`: the official shapes and
  error envelope (400 for a missing beta header, a missing or unknown key, a bad value;
  401 for a bad key; 404 for an unknown workflow or session).
- `POST /v1/chatkit/conversation`: `threads.create`, `threads.add_user_message` and
  `threads.add_client_tool_output`, streamed as SSE exactly as `ChatKitServer` does.
- `POST /v1/responses`, `POST /v1/chat/completions`: the model APIs an Agents SDK agent calls
  (`model_api.py`), steered by the same trigger phrases.
- `GET /_emulator/stats`: counters that tests use to observe the upstream side, and the latest
  model requests; `GET /_emulator/model_requests`: every kept model request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from healthagent_service.emulator import chatkit_wire as wire
from healthagent_service.emulator.http_server import (
    DropConnection,
    HttpRequest,
    HttpResponse,
    HttpServer,
)
from healthagent_service.emulator.model_api import STATS_RECORDS, ModelApi, ModelRequestRecord
from healthagent_service.emulator.realtime_emulator import RealtimeEmulator
from healthagent_service.emulator.script import (
    FATAL_MESSAGE,
    RATE_LIMIT_RETRY_AFTER_SECONDS,
    Reply,
    plan_reply,
    stamp_text,
)

SESSION_FIELDS = frozenset(
    {"user", "workflow", "expires_after", "rate_limits", "chatkit_configuration"}
)
WORKFLOW_FIELDS = frozenset({"id", "version", "state_variables", "tracing"})
DEFAULT_TTL_SECONDS = 600
MAX_STATE_VARIABLES = 64
MAX_THREADS = 100_000
JSON_HEADERS = [("content-type", "application/json")]
HUGE_LINE_BYTES = 9 * 1024 * 1024  # over the service's 8 MiB event limit
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How the emulator behaves. `api_key` is the only key it accepts."""

    api_key: str
    workflows: frozenset[str]
    chunk_delay_seconds: float = 0.025
    slow_first_byte_seconds: float = 3.0

    def __repr__(self) -> str:
        return f"EmulatorConfig(workflows={sorted(self.workflows)!r})"


@dataclass(slots=True)
class EmulatedSession:
    id: str
    client_secret: str
    user: str
    workflow: dict[str, Any]
    expires_at: int
    max_requests_per_1_minute: int
    status: str = "active"

    def usable(self) -> bool:
        return self.status == "active" and time.time() < self.expires_at


@dataclass(slots=True)
class EmulatedThread:
    id: str
    user: str
    pending_call_id: str | None = None
    messages: int = 0


@dataclass(slots=True)
class EmulatorStats:
    """What happened upstream, for tests and demos.

    `streams_*` and `chunks_sent` count every streamed body, ChatKit's and the model APIs';
    `model_*` count the model APIs alone (their requests are in `ChatKitEmulator.model_requests`).
    """

    sessions_minted: int = 0
    sessions_cancelled: int = 0
    conversation_requests: int = 0
    streams_completed: int = 0
    streams_disconnected: int = 0
    streams_open: int = 0
    chunks_sent: int = 0
    # time.monotonic() when the last client was seen leaving (CLOCK_MONOTONIC is shared by all
    # processes on the machine, so a benchmark can measure cancellation latency against it).
    last_disconnect_at: float = 0.0
    model_requests: int = 0  # POST /v1/responses and /v1/chat/completions
    model_requests_rejected: int = 0  # answered with an HTTP error status (401, 400, [http NNN])
    model_streams_completed: int = 0  # streamed to their terminal event
    model_streams_disconnected: int = 0  # the client left before the body ended


def _json(status: int, body: bytes) -> HttpResponse:
    return HttpResponse(status, list(JSON_HEADERS), body)


def _error(status: int, message: str, code: str | None, param: str | None = None) -> HttpResponse:
    return _json(status, wire.error_envelope(message, code=code, param=param))


class ChatKitEmulator:
    """An HTTP server that behaves like ChatKit for one API key and a set of workflows."""

    def __init__(self, config: EmulatorConfig, realtime: RealtimeEmulator | None = None) -> None:
        self.config = config
        # Serves /v1/realtime/client_secrets on this HTTP port when set.
        self.realtime = realtime
        self.stats = EmulatorStats()
        # The bodies of the latest session requests, so tests can check exactly what was sent.
        self.session_requests: deque[dict[str, Any]] = deque(maxlen=100)
        self._sessions: dict[str, EmulatedSession] = {}
        self._by_secret: dict[str, EmulatedSession] = {}
        self._threads: OrderedDict[str, EmulatedThread] = OrderedDict()
        self.model_api = ModelApi(self)
        self._http = HttpServer(self.handle, on_disconnect=self._disconnected)
        self.port = 0

    @property
    def model_requests(self) -> deque[ModelRequestRecord]:
        """The latest model API requests (at most 1,000), oldest first."""
        return self.model_api.requests

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port; return the port."""
        self.port = await self._http.start(host, port)
        return self.port

    async def close(self) -> None:
        """Stop serving."""
        await self._http.close()

    def _disconnected(self) -> None:
        self.stats.streams_disconnected += 1
        self.stats.last_disconnect_at = time.monotonic()

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Route one request."""
        path = request.path.split("?", 1)[0]
        if request.method == "GET" and path == "/_emulator/stats":
            stats: dict[str, Any] = asdict(self.stats)
            if self.realtime is not None:
                stats["realtime"] = self.realtime.stats_json()
            stats["model_requests_latest"] = self.model_api.records_json(STATS_RECORDS)
            return _json(200, json.dumps(stats).encode())
        if request.method == "GET" and path == "/_emulator/model_requests":
            return _json(200, json.dumps({"data": self.model_api.records_json()}).encode())
        if request.method != "POST":
            return _error(405, f"Method {request.method} not allowed.", None)
        if path == "/v1/chatkit/conversation":
            return await self._conversation(request)
        if path == "/v1/responses":
            return await self.model_api.responses(request)
        if path == "/v1/chat/completions":
            return await self.model_api.chat_completions(request)
        if path == "/v1/chatkit/sessions":
            return self._create_session(request)
        if path == "/v1/realtime/client_secrets" and self.realtime is not None:
            return self.realtime.handle_client_secrets(request)
        parts = path.split("/")
        if (
            len(parts) == 6
            and parts[:4] == ["", "v1", "chatkit", "sessions"]
            and (parts[5] == "cancel")
        ):
            return self._cancel_session(request, parts[4])
        return _error(404, f"Invalid URL (POST {path})", None)

    # -- sessions --------------------------------------------------------------------------

    def _check_server_key(self, request: HttpRequest) -> HttpResponse | None:
        if request.headers.get("openai-beta") != "chatkit_beta=v1":
            return _error(
                400, "You must provide the 'OpenAI-Beta: chatkit_beta=v1' header.", "invalid_beta"
            )
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not secrets.compare_digest(
            auth[7:].encode(), self.config.api_key.encode()
        ):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return None

    def _create_session(self, request: HttpRequest) -> HttpResponse:
        refused = self._check_server_key(request)
        if refused is not None:
            return refused
        try:
            body = json.loads(request.body)
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", None)
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", "invalid_type")
        self.session_requests.append(body)
        invalid = _validate_session_request(body)
        if invalid is not None:
            return invalid
        workflow = body["workflow"]
        if workflow["id"] not in self.config.workflows:
            return _error(404, f"Workflow with id '{workflow['id']}' not found.", None)
        ttl = int((body.get("expires_after") or {}).get("seconds", DEFAULT_TTL_SECONDS))
        limit = int((body.get("rate_limits") or {}).get("max_requests_per_1_minute", 10))
        session = EmulatedSession(
            id=f"cksess_{secrets.token_hex(16)}",
            client_secret=f"ek_emu_{secrets.token_urlsafe(24)}",
            user=body["user"],
            workflow={
                "id": workflow["id"],
                "version": workflow.get("version"),
                "state_variables": workflow.get("state_variables"),
                "tracing": {"enabled": bool((workflow.get("tracing") or {}).get("enabled", True))},
            },
            expires_at=int(time.time()) + ttl,
            max_requests_per_1_minute=limit,
        )
        self._sessions[session.id] = session
        self._by_secret[session.client_secret] = session
        self.stats.sessions_minted += 1
        return _json(200, json.dumps(_session_json(session)).encode())

    def _cancel_session(self, request: HttpRequest, session_id: str) -> HttpResponse:
        refused = self._check_server_key(request)
        if refused is not None:
            return refused
        session = self._sessions.get(session_id)
        if session is None:
            return _error(404, f"ChatKit session with id '{session_id}' not found.", None)
        session.status = "cancelled"
        self._by_secret.pop(session.client_secret, None)
        self.stats.sessions_cancelled += 1
        answer = _session_json(session)
        answer["client_secret"] = ""
        return _json(200, json.dumps(answer).encode())

    # -- conversation ----------------------------------------------------------------------

    async def _conversation(self, request: HttpRequest) -> HttpResponse:
        self.stats.conversation_requests += 1
        auth = request.headers.get("authorization", "")
        session = self._by_secret.get(auth[7:]) if auth.startswith("Bearer ") else None
        if session is None or not session.usable():
            return _error(401, "Invalid or expired ChatKit client secret.", "invalid_client_secret")
        try:
            body = json.loads(request.body)
            op = body["type"]
            params = body.get("params") or {}
        except (ValueError, TypeError, KeyError):
            return _error(400, "Invalid ChatKit request.", "invalid_request")
        text: str | None = None
        if op in ("threads.create", "threads.add_user_message"):
            text = _input_text(params)
            if text is None:
                return _error(
                    400,
                    "params.input.content must hold input_text.",
                    "invalid_value",
                    "params.input",
                )
        if op == "threads.create":
            thread = self._new_thread(session.user)
            return self._reply(thread, plan_reply(text), created=True, user_text=text)
        thread_id = params.get("thread_id")
        known = self._threads.get(thread_id) if isinstance(thread_id, str) else None
        if known is None or known.user != session.user:
            return _error(404, f"Thread with id '{thread_id}' not found.", None, "thread_id")
        thread = known
        self._threads.move_to_end(thread.id)
        if op == "threads.add_user_message":
            return self._reply(thread, plan_reply(text), created=False, user_text=text)
        if op == "threads.add_client_tool_output":
            if thread.pending_call_id is None:
                return _error(
                    400,
                    f"Last thread item in {thread.id} was not a ClientToolCallItem",
                    "invalid_request",
                )
            thread.pending_call_id = None
            reply = plan_reply(None, params.get("result"), has_tool_result=True)
            return self._reply(thread, reply, created=False, user_text=None)
        return _error(400, f"Unsupported ChatKit request type {op!r}.", "invalid_request", "type")

    def _new_thread(self, user: str) -> EmulatedThread:
        # Ids as short as the SDK's (8 hex digits) collide after tens of thousands of threads;
        # never hand out one that is in use.
        thread_id = f"thr_{secrets.token_hex(4)}"
        while thread_id in self._threads:
            thread_id = f"thr_{secrets.token_hex(4)}"
        thread = EmulatedThread(id=thread_id, user=user)
        self._threads[thread.id] = thread
        while len(self._threads) > MAX_THREADS:
            self._threads.popitem(last=False)
        return thread

    def _reply(
        self, thread: EmulatedThread, reply: Reply, *, created: bool, user_text: str | None
    ) -> HttpResponse:
        if reply.http_status is not None and reply.http_status >= 400:
            limited = reply.http_status == 429
            response = _error(
                reply.http_status,
                f"Emulated HTTP {reply.http_status}.",
                "rate_limit_exceeded" if limited else None,
            )
            if limited:
                response.headers.append(("retry-after", str(RATE_LIMIT_RETRY_AFTER_SECONDS)))
            return response
        return HttpResponse(
            200, list(SSE_HEADERS), stream=self._stream(thread, reply, created, user_text)
        )

    async def _stream(
        self, thread: EmulatedThread, reply: Reply, created: bool, user_text: str | None
    ) -> AsyncGenerator[bytes, None]:
        stats = self.stats
        stats.streams_open += 1
        try:
            if reply.slow_first_byte:
                await asyncio.sleep(self.config.slow_first_byte_seconds)
            if created:
                yield wire.sse(wire.thread_created(thread.id, wire.now_iso()))
            if user_text is not None:
                yield wire.sse(
                    wire.user_message_done(
                        f"msg_{secrets.token_hex(4)}", thread.id, wire.now_iso(), user_text
                    )
                )
            yield wire.sse(wire.stream_options())
            async for frame in self._respond(thread, reply):
                yield frame
            stats.streams_completed += 1
        finally:
            stats.streams_open -= 1

    async def _respond(self, thread: EmulatedThread, reply: Reply) -> AsyncIterator[bytes]:
        stats = self.stats
        delay = self.config.chunk_delay_seconds if reply.pace_ms is None else reply.pace_ms / 1000
        stamped: list[str] | None = [] if reply.stamp else None
        yield wire.sse(wire.progress())
        if reply.notice is not None:
            yield wire.sse(wire.notice())
        item_id = f"msg_{secrets.token_hex(4)}"
        created_at = wire.now_iso()
        yield wire.sse(wire.assistant_added(item_id, thread.id, created_at))
        yield wire.sse(wire.content_part_added(item_id))
        head, tail = wire.text_delta_prefix(item_id)
        for index, chunk in enumerate(reply.chunks):
            if index == reply.fail_after:
                yield wire.sse(wire.stream_error())
                return
            if index == reply.fatal_after:
                yield wire.sse(wire.fatal_error(FATAL_MESSAGE))
                return
            if index == reply.malformed_after:
                yield b"data: {this is not json\n\n"
                return
            if index == reply.huge_after:
                yield b"data: " + b"x" * HUGE_LINE_BYTES + b"\n\n"
                return
            if index == reply.end_after:
                return
            if index == reply.stall_after:
                await asyncio.sleep(self.config.slow_first_byte_seconds)
            if index == reply.drop_after:
                raise DropConnection
            if delay:
                await asyncio.sleep(delay)
            text = chunk
            if stamped is not None:
                text = stamp_text(time.monotonic_ns())
                stamped.append(text)
            yield head + json.dumps(text, ensure_ascii=False).encode() + tail
            stats.chunks_sent += 1
        text = reply.text if stamped is None else "".join(stamped)
        closing = wire.sse(wire.content_part_done(item_id, text)) + wire.sse(
            wire.assistant_done(item_id, thread.id, created_at, text)
        )
        if reply.no_data_prefix:
            closing = closing.replace(b"data: ", b"")
        yield closing
        thread.messages += 1
        if reply.tool_call:
            call_id = f"call_{secrets.token_hex(6)}"
            thread.pending_call_id = call_id
            yield wire.sse(
                wire.tool_call_done(
                    f"tc_{secrets.token_hex(4)}", thread.id, wire.now_iso(), call_id
                )
            )


def _input_text(params: dict[str, Any]) -> str | None:
    try:
        parts = params["input"]["content"]
        texts = [p["text"] for p in parts if p.get("type") == "input_text"]
    except (KeyError, TypeError, AttributeError):
        return None
    return "".join(texts) if texts and all(isinstance(t, str) for t in texts) else None


def _session_json(session: EmulatedSession) -> dict[str, Any]:
    return {
        "id": session.id,
        "object": "chatkit.session",
        "status": session.status if session.usable() or session.status != "active" else "expired",
        "client_secret": session.client_secret,
        "expires_at": session.expires_at,
        "max_requests_per_1_minute": session.max_requests_per_1_minute,
        "rate_limits": {"max_requests_per_1_minute": session.max_requests_per_1_minute},
        "user": session.user,
        "workflow": session.workflow,
        "chatkit_configuration": {
            "automatic_thread_titling": {"enabled": True},
            "file_upload": {"enabled": False, "max_file_size": 512, "max_files": 10},
            "history": {"enabled": True, "recent_threads": None},
        },
    }


def _validate_session_request(body: dict[str, Any]) -> HttpResponse | None:
    """The sessions API's own checks, in its order: unknown keys, required keys, values."""
    for key in body:
        if key not in SESSION_FIELDS:
            return _error(400, f"Unknown parameter: '{key}'.", "unknown_parameter", key)
    for key in ("user", "workflow"):
        if key not in body:
            return _error(
                400, f"Missing required parameter: '{key}'.", "missing_required_parameter", key
            )
    if not isinstance(body["user"], str) or not body["user"]:
        return _error(400, "Invalid 'user': expected a non-empty string.", "invalid_value", "user")
    workflow = body["workflow"]
    if not isinstance(workflow, dict):
        return _error(400, "Invalid 'workflow': expected an object.", "invalid_type", "workflow")
    for key in workflow:
        if key not in WORKFLOW_FIELDS:
            return _error(
                400, f"Unknown parameter: 'workflow.{key}'.", "unknown_parameter", f"workflow.{key}"
            )
    if not isinstance(workflow.get("id"), str) or not workflow["id"]:
        return _error(
            400,
            "Missing required parameter: 'workflow.id'.",
            "missing_required_parameter",
            "workflow.id",
        )
    variables = workflow.get("state_variables")
    if variables is not None:
        if not isinstance(variables, dict) or len(variables) > MAX_STATE_VARIABLES:
            return _error(
                400,
                "Invalid 'workflow.state_variables': at most 64 keys.",
                "invalid_value",
                "workflow.state_variables",
            )
        for name, value in variables.items():
            if not isinstance(value, (str, int, float, bool)):
                return _error(
                    400,
                    f"Invalid 'workflow.state_variables.{name}': expected a "
                    "string, number or boolean.",
                    "invalid_type",
                    f"workflow.state_variables.{name}",
                )
    expires = body.get("expires_after")
    if expires is not None:
        seconds = expires.get("seconds") if isinstance(expires, dict) else None
        if (
            not isinstance(expires, dict)
            or expires.get("anchor") != "created_at"
            or not isinstance(seconds, int)
            or not 1 <= seconds <= DEFAULT_TTL_SECONDS
        ):
            return _error(
                400,
                "Invalid 'expires_after': anchor must be 'created_at' and seconds within 1..600.",
                "invalid_value",
                "expires_after.seconds",
            )
    return None
