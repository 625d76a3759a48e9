"""The Realtime side of the emulator: ephemeral secrets and the GA WebSocket protocol (text).

- `POST /v1/realtime/client_secrets` (served by the emulator's HTTP server) mints `ek_` secrets.
- `ws://HOST:PORT/v1/realtime?model=...` speaks the GA event protocol: `session.created` first,
  `session.update`, `conversation.item.create`, `response.create`; replies stream as
  `response.output_text.delta` (with the undocumented `obfuscation` field) or function calls,
  end with `response.done` (usage), and `rate_limits.updated` comes before or after it.
- Failures as the real service shows them: a bad key is an `error` event and close 3000 after the
  upgrade (or HTTP 401 at the handshake, as older servers did, when configured); the retired
  `OpenAI-Beta: realtime=v1` header is closed with 4000; a session that reaches its maximum
  duration gets `session_expired` and close 1001.
Replies follow the same scripts and trigger phrases as the ChatKit side (`script.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from healthagent_service.emulator import chatkit_wire as wire
from healthagent_service.emulator.http_server import LISTEN_BACKLOG, HttpRequest, HttpResponse
from healthagent_service.emulator.script import TOOL_ARGUMENTS, TOOL_NAME, Reply, plan_reply

MIN_SECRET_SECONDS, MAX_SECRET_SECONDS, DEFAULT_SECRET_SECONDS = 10, 7200, 600
CLOSE_SESSION_EXPIRED = 1001
CLOSE_AUTH_FAILED = 3000
CLOSE_BAD_REQUEST = 4000
RATE_LIMIT_MESSAGE = (
    "Rate limit reached for gpt-realtime on tokens per min (TPM): Limit 15000000. "
    "Please try again in 6.9s."
)


@dataclass(frozen=True, slots=True)
class RealtimeEmulatorConfig:
    """How the Realtime side behaves. `api_key` is the only server key it accepts."""

    api_key: str
    chunk_delay_seconds: float = 0.025
    slow_first_byte_seconds: float = 3.0
    session_max_seconds: float = 3600.0
    reject_auth_at_handshake: bool = False
    ping_interval_seconds: float | None = 20.0
    ping_timeout_seconds: float | None = 20.0

    def __repr__(self) -> str:
        return f"RealtimeEmulatorConfig(session_max_seconds={self.session_max_seconds})"


@dataclass(slots=True)
class RealtimeStats:
    """What happened upstream, for tests and demos."""

    secrets_minted: int = 0
    connections_opened: int = 0
    connections_open: int = 0
    auth_failures: int = 0
    sessions_expired: int = 0
    responses_completed: int = 0
    responses_interrupted: int = 0
    closed_by_client: int = 0


@dataclass(slots=True)
class RealtimeSession:
    """One WebSocket session and the conversation items it holds."""

    id: str
    conversation_id: str
    config: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)
    responses: int = 0


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _event(event_type: str, **fields: Any) -> str:
    return json.dumps(
        {"type": event_type, "event_id": _id("event"), **fields},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _error_event(code: str, message: str, error_type: str = "invalid_request_error") -> str:
    return _event(
        "error",
        error={
            "type": error_type,
            "code": code,
            "message": message,
            "param": None,
            "event_id": None,
        },
    )


class RealtimeEmulator:
    """A websockets server that behaves like the Realtime API for one key."""

    def __init__(self, config: RealtimeEmulatorConfig) -> None:
        self.config = config
        self.stats = RealtimeStats()
        self.sessions: dict[str, RealtimeSession] = {}
        # The bodies of the latest client-secret requests, so tests can check what was sent.
        self.secret_requests: deque[dict[str, Any]] = deque(maxlen=100)
        # Handshake headers seen (lower-case names), to check what clients send.
        self.handshake_headers: deque[dict[str, str]] = deque(maxlen=100)
        self._secrets: dict[str, float] = {}  # ek_ secret -> expiry (Unix seconds)
        self._connections: set[ServerConnection] = set()
        self._closed_by_us: set[ServerConnection] = set()
        self._server: Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port; return the port."""
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._check_handshake,
            ping_interval=self.config.ping_interval_seconds,
            ping_timeout=self.config.ping_timeout_seconds,
            max_size=16 * 1024 * 1024,
            compression=None,
            backlog=LISTEN_BACKLOG,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop serving and close every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def drop_all(self, code: int = 1011, reason: str = "emulator drop") -> None:
        """Close every open connection from the server side (tests use it to force reconnects)."""
        for connection in list(self._connections):
            await self._close(connection, code, reason)

    async def _close(self, connection: ServerConnection, code: int, reason: str) -> None:
        self._closed_by_us.add(connection)
        await connection.close(code, reason)

    # -- ephemeral secrets (HTTP) ----------------------------------------------------------

    def handle_client_secrets(self, request: HttpRequest) -> HttpResponse:
        """`POST /v1/realtime/client_secrets` with the server key."""
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not secrets.compare_digest(
            auth[7:].encode(), self.config.api_key.encode()
        ):
            return _http_error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = json.loads(request.body or b"{}")
            self.secret_requests.append(body)
            expires = body.get("expires_after") or {}
            seconds = int(expires.get("seconds", DEFAULT_SECRET_SECONDS))
            session = body.get("session") or {}
        except (ValueError, TypeError, AttributeError):
            return _http_error(400, "We could not parse the JSON body of your request.", None)
        if not MIN_SECRET_SECONDS <= seconds <= MAX_SECRET_SECONDS:
            return _http_error(
                400,
                "Invalid 'expires_after.seconds': must be within 10..7200.",
                "invalid_value",
                "expires_after.seconds",
            )
        if session.get("type", "realtime") != "realtime":
            return _http_error(400, "Invalid 'session.type'.", "invalid_value", "session.type")
        value = f"ek_{secrets.token_hex(16)}"
        expires_at = int(time.time()) + seconds
        self._secrets[value] = expires_at
        self.stats.secrets_minted += 1
        answer = {
            "value": value,
            "expires_at": expires_at,
            "session": {**_session_config(session), "id": _id("sess")},
        }
        return HttpResponse(
            200, [("content-type", "application/json")], json.dumps(answer).encode()
        )

    def _authorized(self, token: str) -> bool:
        if secrets.compare_digest(token.encode(), self.config.api_key.encode()):
            return True
        expiry = self._secrets.get(token)
        # An ephemeral secret only limits opening connections; a session outlives it.
        return expiry is not None and time.time() < expiry

    # -- WebSocket -------------------------------------------------------------------------

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshake_headers.append({k.lower(): v for k, v in request.headers.raw_items()})
        if urlsplit(request.path).path != "/v1/realtime":
            return connection.respond(HTTPStatus.NOT_FOUND, "Not found\n")
        if self.config.reject_auth_at_handshake and not self._authorized(_bearer(request)):
            self.stats.auth_failures += 1
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided.\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        self.stats.connections_opened += 1
        self.stats.connections_open += 1
        self._connections.add(connection)
        expiry: asyncio.TimerHandle | None = None
        try:
            if request.headers.get("OpenAI-Beta", "").startswith("realtime="):
                await connection.send(
                    _error_event(
                        "invalid_beta",
                        "The beta Realtime API shape is retired; "
                        "remove the 'OpenAI-Beta: realtime=v1' header.",
                    )
                )
                await self._close(connection, CLOSE_BAD_REQUEST, "beta shape retired")
                return
            if not self._authorized(_bearer(request)):
                self.stats.auth_failures += 1
                await connection.send(
                    _error_event("invalid_api_key", "Incorrect API key provided.")
                )
                await self._close(connection, CLOSE_AUTH_FAILED, "invalid_api_key")
                return
            model = parse_qs(urlsplit(request.path).query).get("model", [""])[0]
            if not model:
                await connection.send(_error_event("missing_model", "Missing model parameter."))
                await self._close(connection, CLOSE_BAD_REQUEST, "missing model")
                return
            session = RealtimeSession(
                id=_id("sess"),
                conversation_id=_id("conv"),
                config=_session_config({"model": model}),
            )
            self.sessions[session.id] = session
            expiry = asyncio.get_running_loop().call_later(
                self.config.session_max_seconds,
                lambda: asyncio.ensure_future(self._expire(connection)),
            )
            await connection.send(
                _event("session.created", session={**session.config, "id": session.id})
            )
            await self._serve(connection, session)
        except ConnectionClosed:
            pass
        finally:
            if expiry is not None:
                expiry.cancel()
            self._connections.discard(connection)
            self.stats.connections_open -= 1
            if connection not in self._closed_by_us:
                self.stats.closed_by_client += 1
            self._closed_by_us.discard(connection)

    async def _expire(self, connection: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.stats.sessions_expired += 1
            await connection.send(
                _error_event(
                    "session_expired", "Your session hit the maximum duration of 60 minutes."
                )
            )
            await self._close(connection, CLOSE_SESSION_EXPIRED, "session_expired")

    async def _serve(self, connection: ServerConnection, session: RealtimeSession) -> None:
        async for message in connection:
            try:
                event = json.loads(message)
                event_type = event["type"]
            except (ValueError, TypeError, KeyError):
                await connection.send(_error_event("invalid_json", "Invalid event."))
                continue
            if event_type == "session.update":
                update = event.get("session") or {}
                session.config.update({k: v for k, v in update.items() if k != "type"})
                await connection.send(
                    _event("session.updated", session={**session.config, "id": session.id})
                )
            elif event_type == "conversation.item.create":
                await self._add_item(connection, session, dict(event.get("item") or {}))
            elif event_type == "response.create":
                await self._respond(connection, session)
            elif event_type == "response.cancel":
                continue
            else:
                await connection.send(
                    _error_event(
                        "invalid_event", f"Invalid value: '{event_type}'. Supported values are: ..."
                    )
                )

    async def _add_item(
        self, connection: ServerConnection, session: RealtimeSession, item: dict[str, Any]
    ) -> None:
        item.setdefault("id", _id("item"))
        item.setdefault("object", "realtime.item")
        if item.get("type") == "message":
            item.setdefault("status", "completed")
        previous = session.items[-1]["id"] if session.items else None
        session.items.append(item)
        await connection.send(
            _event("conversation.item.added", previous_item_id=previous, item=item)
        )
        await connection.send(
            _event("conversation.item.done", previous_item_id=previous, item=item)
        )

    def _plan(self, session: RealtimeSession) -> Reply:
        for item in reversed(session.items):
            if item.get("type") == "function_call_output":
                try:
                    result = json.loads(item.get("output") or "null")
                except ValueError:
                    result = item.get("output")
                return plan_reply(None, result, has_tool_result=True)
            if item.get("type") == "message" and item.get("role") == "user":
                text = "".join(
                    part.get("text", "")
                    for part in item.get("content") or ()
                    if part.get("type") == "input_text"
                )
                return plan_reply(text)
        return plan_reply("")

    async def _respond(self, connection: ServerConnection, session: RealtimeSession) -> None:
        reply = self._plan(session)
        session.responses += 1
        rate_limits_first = session.responses % 2 == 1
        if reply.slow_first_byte:
            await asyncio.sleep(self.config.slow_first_byte_seconds)
        if reply.fail_after is not None:  # "[error]": a non-fatal error, then the answer
            await connection.send(_error_event("emulated_error", "An emulated, non-fatal error."))
        if rate_limits_first:
            await connection.send(_rate_limits())
        response_id = _id("resp")
        base = {
            "object": "realtime.response",
            "id": response_id,
            "conversation_id": session.conversation_id,
            "output_modalities": session.config.get("output_modalities", ["text"]),
        }
        await connection.send(
            _event(
                "response.created",
                response={
                    **base,
                    "status": "in_progress",
                    "status_details": None,
                    "output": [],
                    "usage": None,
                },
            )
        )
        if reply.rate_limited:
            await connection.send(
                _event(
                    "response.done",
                    response={
                        **base,
                        "status": "failed",
                        "output": [],
                        "usage": _usage(session, 0),
                        "status_details": {
                            "type": "failed",
                            "error": {
                                "type": "tokens",
                                "code": "rate_limit_exceeded",
                                "message": RATE_LIMIT_MESSAGE,
                            },
                        },
                    },
                )
            )
            return
        output = [await self._message(connection, session, response_id, reply)]
        if reply.tool_call:
            output.append(await self._function_call(connection, session, response_id))
        session.items.extend(output)
        await connection.send(
            _event(
                "response.done",
                response={
                    **base,
                    "status": "completed",
                    "status_details": None,
                    "output": output,
                    "usage": _usage(session, len(reply.chunks)),
                },
            )
        )
        self.stats.responses_completed += 1
        if not rate_limits_first:
            await connection.send(_rate_limits())

    async def _message(
        self, connection: ServerConnection, session: RealtimeSession, response_id: str, reply: Reply
    ) -> dict[str, Any]:
        item_id = _id("item")
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0}
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        await connection.send(
            _event("response.output_item.added", response_id=response_id, output_index=0, item=item)
        )
        await connection.send(
            _event("conversation.item.added", previous_item_id=_last_id(session), item=item)
        )
        await connection.send(
            _event(
                "response.content_part.added",
                **where,
                content_index=0,
                part={"type": "text", "text": ""},
            )
        )
        delay = self.config.chunk_delay_seconds if reply.pace_ms is None else reply.pace_ms / 1000
        for index, chunk in enumerate(reply.chunks):
            if index == reply.drop_after:
                self.stats.responses_interrupted += 1
                await self._close(connection, 1011, "emulated drop")
                raise ConnectionClosed(None, None)
            if delay:
                await asyncio.sleep(delay)
            await connection.send(
                _event(
                    "response.output_text.delta",
                    **where,
                    content_index=0,
                    delta=chunk,
                    obfuscation=_obfuscation(chunk),
                )
            )
        text = reply.text
        await connection.send(
            _event("response.output_text.done", **where, content_index=0, text=text)
        )
        await connection.send(
            _event(
                "response.content_part.done",
                **where,
                content_index=0,
                part={"type": "text", "text": text},
            )
        )
        done = {**item, "status": "completed", "content": [{"type": "output_text", "text": text}]}
        await connection.send(
            _event("response.output_item.done", response_id=response_id, output_index=0, item=done)
        )
        await connection.send(
            _event("conversation.item.done", previous_item_id=_last_id(session), item=done)
        )
        return done

    async def _function_call(
        self, connection: ServerConnection, session: RealtimeSession, response_id: str
    ) -> dict[str, Any]:
        item_id, call_id = _id("item"), _id("call")
        arguments = json.dumps(TOOL_ARGUMENTS)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": TOOL_NAME,
            "call_id": call_id,
            "arguments": "",
        }
        where = {
            "response_id": response_id,
            "item_id": item_id,
            "output_index": 1,
            "call_id": call_id,
        }
        await connection.send(
            _event("response.output_item.added", response_id=response_id, output_index=1, item=item)
        )
        half = len(arguments) // 2
        for delta in (arguments[:half], arguments[half:]):
            await connection.send(
                _event("response.function_call_arguments.delta", **where, delta=delta)
            )
        await connection.send(
            _event(
                "response.function_call_arguments.done",
                **where,
                name=TOOL_NAME,
                arguments=arguments,
            )
        )
        done = {**item, "status": "completed", "arguments": arguments}
        await connection.send(
            _event("response.output_item.done", response_id=response_id, output_index=1, item=done)
        )
        return done

    def stats_json(self) -> dict[str, Any]:
        """The counters as a dict."""
        return asdict(self.stats)


def _session_config(requested: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "realtime",
        "object": "realtime.session",
        "model": requested.get("model", "gpt-realtime"),
        "output_modalities": requested.get("output_modalities", ["audio"]),
        "instructions": requested.get("instructions", ""),
        "tools": requested.get("tools", []),
        "tool_choice": "auto",
        "max_output_tokens": "inf",
    }


def _bearer(request: Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else ""


def _last_id(session: RealtimeSession) -> str | None:
    return session.items[-1]["id"] if session.items else None


def _obfuscation(chunk: str) -> str:
    # The real service pads deltas to hide their length; any opaque string will do here.
    return secrets.token_urlsafe(max(1, 12 - len(chunk) % 12))[:16]


def _usage(session: RealtimeSession, output_tokens: int) -> dict[str, Any]:
    input_tokens = sum(len(json.dumps(item)) // 16 for item in session.items)
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {"text_tokens": input_tokens, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0},
    }


def _rate_limits() -> str:
    return _event(
        "rate_limits.updated",
        rate_limits=[
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
            {"name": "tokens", "limit": 15000000, "remaining": 14999716, "reset_seconds": 0.001},
        ],
    )


def _http_error(
    status: int, message: str, code: str | None, param: str | None = None
) -> HttpResponse:
    return HttpResponse(
        status,
        [("content-type", "application/json")],
        wire.error_envelope(message, code=code, param=param),
    )
