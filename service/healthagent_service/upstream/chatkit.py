"""ChatKit over HTTP: minting sessions and streaming turns (hosted, self-hosted or emulator).

Wire formats: ChatKit's `POST {base}/chatkit/sessions` (mint), `.../sessions/{id}/cancel`, and
`POST {base}/chatkit/conversation` (a turn, answered with Server-Sent Events that
`chatkit_events` reads). This module knows HTTP and ChatKit JSON; it yields
`domain.events.ChatEvent`s and raises `HealthAgentError`s, nothing gRPC.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from healthagent_service.domain.events import (
    ChatEvent,
    ChatTurn,
    MintedSession,
    SessionOptions,
    SessionStarted,
)
from healthagent_service.domain.session_pool import DEFAULT_MAX_BYTES, SessionPool
from healthagent_service.errors import (
    ErrorKind,
    FieldViolation,
    HealthAgentError,
    conversation_not_found,
)
from healthagent_service.security.agent_tokens import issue_agent_token
from healthagent_service.upstream.chatkit_events import (
    ChatKitTurn,
    protocol_error,
    truncated_stream,
)
from healthagent_service.upstream.http_clients import ShardedHttpClient
from healthagent_service.upstream.sse import SSEProtocolError
from healthagent_service.upstream.sse_client import BufferBudgetExceededError
from healthagent_service.upstream.upstream_json import decode_json, upstream_id

log = structlog.get_logger(__name__)

CHATKIT_BETA_HEADER = ("OpenAI-Beta", "chatkit_beta=v1")
# Header that carries the end user's id to a self-hosted ChatKit server, to scope its threads:
# percent-encoded UTF-8 (`forwarded_user`), since header values are bytes of Latin-1 at most
FORWARDED_USER_HEADER = "X-HealthAgent-User"
# printable ASCII but "%" stays as it is: the common ids read the same encoded or not
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def forwarded_user(user: str) -> str:
    """`user` as the X-HealthAgent-User header carries it (`urllib.parse.unquote` reads it)."""
    return quote(user, safe=_HEADER_SAFE)


_MAX_ERROR_BODY_BYTES = 64 * 1024
# what a MintSession answer names as the workflow of an agent server's user token
AGENT_WORKFLOW_ID = "agent"
# the agent server's logout endpoint, relative to its ChatKit URL
AGENT_REVOKE_PATH = "tokens/revoke"


@dataclass(frozen=True, slots=True)
class AgentTokenConfig:
    """How to sign user tokens for the project's agent server (`security/agent_tokens.py`)."""

    secret: str
    audience: str
    default_ttl_seconds: int

    def __repr__(self) -> str:  # never show the secret
        return f"AgentTokenConfig(audience={self.audience!r})"


@dataclass(frozen=True, slots=True)
class ChatKitConfig:
    """Where and how to reach ChatKit. `api_key` is None when it is not configured."""

    base_url: str
    api_key: str | None
    workflow_id: str | None
    # Self-hosted ChatKit server endpoint; when set, no hosted sessions are minted.
    self_hosted_url: str | None = None
    # Set when that server is the project's agent server: MintSession signs its user tokens.
    agent_tokens: AgentTokenConfig | None = None
    # ("Header-Name", "value") sent to the self-hosted server.
    self_hosted_auth: tuple[str, str] | None = None
    default_ttl_seconds: int | None = None
    retry_after_seconds: float = 1.0
    # Names the settings in error messages, so an operator knows what to fix.
    api_key_setting: str = "OPENAI_API_KEY"
    workflow_setting: str = "OPENAI_WORKFLOW_ID"

    def __repr__(self) -> str:  # never show the key
        return f"ChatKitConfig(base_url={self.base_url!r}, workflow_id={self.workflow_id!r})"


class ChatKitUpstream:
    """Mints ChatKit sessions (through a `SessionPool`) and streams turns."""

    def __init__(
        self,
        config: ChatKitConfig,
        http: ShardedHttpClient,
        *,
        pool_size: int,
        refresh_fraction: float,
        pool_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._config = config
        self._http = http
        self.pool = SessionPool(
            self.mint, max_size=pool_size, max_bytes=pool_bytes, refresh_fraction=refresh_fraction
        )
        self._conversation_url = config.self_hosted_url or f"{config.base_url}/chatkit/conversation"

    @property
    def self_hosted(self) -> bool:
        """True when turns go to a self-hosted ChatKit server without sessions."""
        return self._config.self_hosted_url is not None

    @property
    def mints_agent_tokens(self) -> bool:
        """True when MintSession signs user tokens for the project's agent server."""
        return self.self_hosted and self._config.agent_tokens is not None

    @property
    def workflow_id(self) -> str:
        """The configured workflow ('' for a self-hosted server)."""
        return "" if self.self_hosted else (self._config.workflow_id or "")

    def session_options(
        self,
        user: str,
        *,
        version: str | None = None,
        state_variables: tuple[tuple[str, str], ...] = (),
        ttl_seconds: int | None = None,
    ) -> SessionOptions:
        """Options for a session of the configured workflow. Chat uses the defaults, so a
        MintSession without overrides shares Chat's pooled session."""
        if self.self_hosted:
            tokens = self._config.agent_tokens
            if tokens is None:
                raise _mint_not_supported()
            ttl = tokens.default_ttl_seconds if ttl_seconds is None else ttl_seconds
            return SessionOptions(user, AGENT_WORKFLOW_ID, version, state_variables, ttl)
        if ttl_seconds is None:
            ttl_seconds = self._config.default_ttl_seconds
        # in field order: built on every MintSession and Chat turn
        return SessionOptions(user, self._require_workflow(), version, state_variables, ttl_seconds)

    # -- minting ---------------------------------------------------------------------------

    async def mint(self, options: SessionOptions) -> MintedSession:
        """Mint a new session upstream (no pooling). Use `pool.get` to share sessions."""
        if self.self_hosted:
            return self._issue_agent_token(options)
        key = self._require_key()
        body: dict[str, Any] = {"user": options.user, "workflow": {"id": options.workflow_id}}
        if options.version is not None:
            body["workflow"]["version"] = options.version
        if options.state_variables:
            body["workflow"]["state_variables"] = {
                name: json.loads(value) for name, value in options.state_variables
            }
        if options.ttl_seconds is not None:
            body["expires_after"] = {"anchor": "created_at", "seconds": options.ttl_seconds}
        headers = {"Authorization": f"Bearer {key}", CHATKIT_BETA_HEADER[0]: CHATKIT_BETA_HEADER[1]}
        try:
            response = await self._http.for_key(options.user).post(
                f"{self._config.base_url}/chatkit/sessions", json=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, phase="mint") from None
        if response.status_code != 200:
            raise self._http_error(
                response.status_code,
                response.content,
                response.headers,
                phase="mint",
                options=options,
            )
        return self._parse_session(response.content, options)

    def _issue_agent_token(self, options: SessionOptions) -> MintedSession:
        tokens = self._config.agent_tokens
        if tokens is None:
            raise _mint_not_supported()
        issued = issue_agent_token(
            tokens.secret,
            tokens.audience,
            options.user,
            options.ttl_seconds or tokens.default_ttl_seconds,
            {name: json.loads(value) for name, value in options.state_variables},
        )
        return MintedSession(
            id=issued.token_id,
            client_secret=issued.token,
            expires_at=issued.expires_at,
            workflow_id=AGENT_WORKFLOW_ID,
            user=options.user,
            minted_at_monotonic=time.monotonic(),
            lifetime_seconds=issued.expires_at.timestamp() - issued.issued_at,
        )

    async def revoke_agent_tokens(self, user: str) -> None:
        """Void every user token the agent server would still accept for `user`."""
        url = httpx.URL(self._conversation_url).join(AGENT_REVOKE_PATH)
        # the user is in the body; the header carries the service's credential alone
        headers = dict([self._config.self_hosted_auth]) if self._config.self_hosted_auth else {}
        try:
            response = await self._http.for_key(user).post(
                # the moment on this clock, which also stamps the tokens' `iat`
                url,
                json={"user": user, "revoked_before": time.time()},
                headers=headers,
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, phase="revoke") from None
        if response.status_code != 200:
            raise self._http_error(
                response.status_code, response.content, response.headers, phase="revoke"
            )

    def _parse_session(self, content: bytes, options: SessionOptions) -> MintedSession:
        try:
            data = decode_json(content)
            expires_at = int(data["expires_at"])
            session_id = upstream_id(data["id"], "session id")
            secret = upstream_id(data["client_secret"], "client secret")
        except (ValueError, TypeError, KeyError) as exc:
            raise protocol_error(f"session answer lacks {exc}", self._retry) from None
        remaining = expires_at - time.time()
        if remaining <= 0:
            raise protocol_error(
                "the upstream minted a session that has already expired", self._retry
            )
        workflow = data.get("workflow") or {}
        return MintedSession(
            id=session_id,
            client_secret=secret,
            expires_at=datetime.fromtimestamp(expires_at, UTC),
            workflow_id=str(workflow.get("id") or options.workflow_id),
            user=str(data.get("user") or options.user),
            minted_at_monotonic=time.monotonic(),
            lifetime_seconds=remaining,
        )

    async def cancel(self, session_id: str) -> None:
        """Cancel a session upstream so its secret stops working."""
        key = self._require_key()
        headers = {"Authorization": f"Bearer {key}", CHATKIT_BETA_HEADER[0]: CHATKIT_BETA_HEADER[1]}
        try:
            response = await self._http.for_key(session_id).post(
                f"{self._config.base_url}/chatkit/sessions/{session_id}/cancel", headers=headers
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, phase="cancel") from None
        if response.status_code != 200:
            raise self._http_error(
                response.status_code, response.content, response.headers, phase="cancel"
            )

    # -- one turn --------------------------------------------------------------------------

    async def chat(self, turn: ChatTurn) -> AsyncGenerator[ChatEvent, None]:
        """Stream one turn. Ends with `ResponseDone`, or raises `HealthAgentError`."""
        body = _turn_request(turn)
        options = None if self.self_hosted else self.session_options(turn.user)
        for attempt in (1, 2):
            session: MintedSession | None = None
            if options is None:
                headers = self._self_hosted_headers(turn.user)
            else:
                session = await self.pool.get(options)
                headers = {"Authorization": f"Bearer {session.client_secret}"}
            headers["Accept"] = "text/event-stream"
            headers["Content-Type"] = "application/json"
            try:
                async with self._http.streams.stream(
                    self._conversation_url, body, headers
                ) as response:
                    if response.status_code != 200:
                        error_body = await response.read_capped(_MAX_ERROR_BODY_BYTES)
                        if (
                            response.status_code == 401
                            and session is not None
                            and options is not None
                            and attempt == 1
                        ):
                            # The pooled secret expired or was cancelled: nothing has reached
                            # the caller yet, so re-mint once and retry.
                            self.pool.evict(options, session.id)
                            log.info("pooled session rejected, re-minting", session_id=session.id)
                            continue
                        raise self._http_error(
                            response.status_code,
                            error_body,
                            response.headers,
                            phase="chat",
                            turn=turn,
                        )
                    started = SessionStarted(
                        session.id if session else "",
                        turn.conversation_id or "",
                        turn.user,
                        self.workflow_id,
                    )
                    # the hot path, inline (a generator layer costs per chunk): SSE events in,
                    # decoded as they arrived, typed events out
                    translator = ChatKitTurn(started, self._config.retry_after_seconds)
                    first = translator.start()
                    if first is not None:
                        yield first
                    translate = translator.translate
                    receive = response.receive_events
                    while events := await receive():
                        for data in events:
                            event = translate(data)
                            if event is not None:
                                yield event
                    if response.ended_inside_event:
                        raise truncated_stream("the body ended inside an event", self._retry)
                    yield translator.finish()
                    return
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, phase="chat") from None
            except SSEProtocolError as exc:
                raise protocol_error(str(exc), self._retry) from None
            except BufferBudgetExceededError as exc:
                raise HealthAgentError(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    "UPSTREAM_BUFFER_FULL",
                    f"the upstream sent more than the service holds at once ({exc}); this "
                    "stream was ended so that the others go on",
                    retry_after_seconds=self._retry,
                ) from None

    def _self_hosted_headers(self, user: str) -> dict[str, str]:
        headers = {FORWARDED_USER_HEADER: forwarded_user(user)}
        if self._config.self_hosted_auth is not None:
            name, value = self._config.self_hosted_auth
            headers[name] = value
        return headers

    # -- errors ----------------------------------------------------------------------------

    def _require_key(self) -> str:
        if not self._config.api_key:
            raise HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_API_KEY_MISSING",
                f"{self._config.api_key_setting} is not set; the service cannot reach ChatKit",
            )
        return self._config.api_key

    def _require_workflow(self) -> str:
        if not self._config.workflow_id:
            raise HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "WORKFLOW_ID_MISSING",
                f"{self._config.workflow_setting} is not set; it names the ChatKit workflow",
            )
        return self._config.workflow_id

    @property
    def _retry(self) -> float:
        return self._config.retry_after_seconds

    def _transport_error(self, exc: httpx.HTTPError, *, phase: str) -> HealthAgentError:
        if isinstance(exc, httpx.TimeoutException):
            return HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_TIMEOUT",
                f"the upstream did not answer in time ({type(exc).__name__})",
                retry_after_seconds=self._config.retry_after_seconds,
            )
        if phase == "chat" and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            return truncated_stream(f"connection lost: {type(exc).__name__}", self._retry)
        return HealthAgentError(
            ErrorKind.UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            f"cannot reach the upstream ({type(exc).__name__})",
            retry_after_seconds=self._config.retry_after_seconds,
        )

    def _http_error(
        self,
        status: int,
        content: bytes,
        headers: httpx.Headers,
        *,
        phase: str,
        options: SessionOptions | None = None,
        turn: ChatTurn | None = None,
    ) -> HealthAgentError:
        message, code, param = _parse_error_envelope(content)
        upstream = {"upstream_status": str(status), "upstream_code": code or ""}
        if status in {401, 403}:
            if phase in {"chat", "revoke"} and self.self_hosted:
                return HealthAgentError(
                    ErrorKind.FAILED_PRECONDITION,
                    "UPSTREAM_AUTH_REJECTED",
                    "the self-hosted ChatKit server rejected the request; check "
                    "HEALTHAGENT_CHATKIT_AUTH_HEADER",
                    metadata=upstream,
                )
            if phase == "chat":
                return HealthAgentError(
                    ErrorKind.UNAVAILABLE,
                    "UPSTREAM_SESSION_REJECTED",
                    "the upstream rejected a freshly minted session",
                    retry_after_seconds=self._config.retry_after_seconds,
                    metadata=upstream,
                )
            return HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_API_KEY_REJECTED",
                f"the upstream rejected {self._config.api_key_setting}; check that setting",
                metadata=upstream,
            )
        if status == 404 and message.startswith("Invalid URL"):
            # The API's answer for a path it does not serve: the base URL is wrong.
            setting = "HEALTHAGENT_CHATKIT_URL" if self.self_hosted else "OPENAI_BASE_URL"
            return HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_ENDPOINT_NOT_FOUND",
                f"the upstream does not serve this endpoint ({message}); check {setting}",
                metadata=upstream,
            )
        if status == 404:
            if phase == "mint":
                workflow = options.workflow_id if options else self._config.workflow_id
                return HealthAgentError(
                    ErrorKind.FAILED_PRECONDITION,
                    "WORKFLOW_NOT_FOUND",
                    f"the upstream has no workflow {workflow!r}; check "
                    f"{self._config.workflow_setting}",
                    metadata=upstream,
                )
            if phase == "chat" and turn is not None and turn.conversation_id:
                return conversation_not_found(turn.conversation_id, **upstream)
            return HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_ENDPOINT_NOT_FOUND",
                f"the upstream answered 404 Not Found for {phase}: {message}",
                metadata=upstream,
            )
        if status == 429:
            return HealthAgentError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "UPSTREAM_RATE_LIMITED",
                f"the upstream is rate limiting requests: {message}",
                retry_after_seconds=_retry_after(headers, self._config.retry_after_seconds),
                metadata=upstream,
            )
        if status >= 500:
            return HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_ERROR",
                f"the upstream failed with HTTP {status}: {message}",
                retry_after_seconds=_retry_after(headers, self._config.retry_after_seconds),
                metadata=upstream,
            )
        if status == 400 and phase == "mint" and param:
            return HealthAgentError(
                ErrorKind.INVALID_ARGUMENT,
                "UPSTREAM_REJECTED_REQUEST",
                f"the upstream rejected the request: {message}",
                field_violations=(FieldViolation(_request_field(param), message),),
                metadata=upstream,
            )
        return HealthAgentError(
            ErrorKind.FAILED_PRECONDITION,
            "UPSTREAM_REJECTED_REQUEST",
            f"the upstream answered HTTP {status}: {message}",
            metadata=upstream,
        )


def _mint_not_supported() -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.FAILED_PRECONDITION,
        "MINT_NOT_SUPPORTED",
        "this service talks to a self-hosted ChatKit server (HEALTHAGENT_CHATKIT_URL), "
        "which has no sessions to mint; use Chat (for the project's agent server, set "
        "HEALTHAGENT_UPSTREAM=agent and HEALTHAGENT_AGENT_TOKEN_SECRET)",
    )


def _turn_request(turn: ChatTurn) -> bytes:
    if turn.tool_output is not None:
        request: dict[str, Any] = {
            "type": "threads.add_client_tool_output",
            "params": {
                "thread_id": turn.conversation_id,
                "result": json.loads(turn.tool_output.output_json),
            },
        }
    else:
        user_input = {
            "content": [{"type": "input_text", "text": turn.message}],
            "attachments": [],
            "quoted_text": "",
            "inference_options": {},
        }
        if turn.conversation_id:
            request = {
                "type": "threads.add_user_message",
                "params": {"thread_id": turn.conversation_id, "input": user_input},
            }
        else:
            request = {"type": "threads.create", "params": {"input": user_input}}
    request["metadata"] = {}
    return json.dumps(request, separators=(",", ":")).encode()


def _parse_error_envelope(content: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, param) from the OpenAI error envelope, tolerating anything else."""
    try:
        error = decode_json(content)["error"]
        return str(error.get("message") or "no message"), error.get("code"), error.get("param")
    except (ValueError, TypeError, KeyError, AttributeError):
        text = content[:200].decode(errors="replace").strip()
        return (text or "no message"), None, None


def _retry_after(headers: httpx.Headers, default: float) -> float:
    value = headers.get("retry-after")
    if value is not None:
        try:
            seconds = float(value)
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
        except ValueError:
            pass
    return default


_PARAM_TO_FIELD = {
    "user": "user",
    "workflow.version": "version",
    "workflow.state_variables": "state_variables",
    "expires_after.seconds": "ttl_seconds",
    "expires_after": "ttl_seconds",
}


def _request_field(param: str) -> str:
    """The MintSessionRequest field an upstream `param` refers to."""
    if param in _PARAM_TO_FIELD:
        return _PARAM_TO_FIELD[param]
    if param.startswith("workflow.state_variables"):
        return "state_variables"
    return param
