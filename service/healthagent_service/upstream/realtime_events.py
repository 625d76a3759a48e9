"""Realtime API (GA) events -> the project's events, and the client events this service sends.

Wire formats: the GA Realtime API's events as OpenAI's Realtime reference names them
(`response.output_text.delta`, `response.done`, `error`...). One `RealtimeTurn` per response;
it ends at `response.done`. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import structlog

from healthagent_service.domain.events import (
    ChatEvent,
    Notice,
    NoticeLevel,
    Passthrough,
    ResponseDone,
    TextDelta,
    TextDone,
    ToolCall,
    Usage,
)
from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.upstream.upstream_json import upstream_id

log = structlog.get_logger(__name__)

CLOSE_SESSION_EXPIRED = 1001
CLOSE_AUTH_FAILED = 3000
CLOSE_BAD_REQUEST = 4000
# Events whose content the typed events already carry, or that echo what this service sent.
_REPRESENTED = frozenset(
    {
        "session.created",
        "session.updated",
        "response.created",
        "response.output_item.added",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.function_call_arguments.delta",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.created",
        "conversation.created",
    }
)
_RETRY_IN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)
_unknown_types_logged: set[str] = set()


def user_message(text: str) -> dict[str, Any]:
    """A conversation item for the user's text."""
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def function_call_output(call_id: str, output_json: str) -> dict[str, Any]:
    """A conversation item answering a function call."""
    return {"type": "function_call_output", "call_id": call_id, "output": output_json}


def item_create(item: dict[str, Any]) -> dict[str, Any]:
    """The client event that adds `item` to the conversation."""
    return {"type": "conversation.item.create", "item": item}


def session_update(instructions: str, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """Configure a fresh session for text output."""
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["text"],
        "instructions": instructions,
    }
    if tools:
        session["tools"] = tools
    return {"type": "session.update", "session": session}


def replayable(item: dict[str, Any]) -> dict[str, Any] | None:
    """The create-able form of an output item (for replay into a new session), if any."""
    kind = item.get("type")
    if kind == "message":
        text = "".join(
            part.get("text") or part.get("transcript") or "" for part in item.get("content") or ()
        )
        return {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text}],
        }
    if kind == "function_call":
        return {
            "type": "function_call",
            "call_id": item.get("call_id"),
            "name": item.get("name"),
            "arguments": item.get("arguments") or "{}",
        }
    return None


def retry_delay(message: str) -> float | None:
    """The delay in "... Please try again in 6.9s." (or 120ms), if the message has one."""
    match = _RETRY_IN.search(message)
    if match is None:
        return None
    value = float(match.group(1))
    return value / 1000 if match.group(2).lower() == "ms" else value


def _error_fields(event: dict[str, Any]) -> tuple[str, str]:
    error = event.get("error") or {}
    return str(error.get("code") or error.get("type") or "error"), str(error.get("message") or "")


def protocol_error(detail: str, retry_after_seconds: float = 1.0) -> HealthAgentError:
    """The status for an event (or an answer) that is not what the Realtime API sends: to be
    retried, like ChatKit's (a bad answer may be a passing fault)."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_PROTOCOL_ERROR",
        f"malformed Realtime event: {detail}",
        retry_after_seconds=retry_after_seconds,
    )


def closed_error(
    code: int | None, last_error: dict[str, Any] | None, *, mid_turn: bool, api_key_setting: str
) -> HealthAgentError:
    """The status for a socket the upstream closed (`code` None: no close frame)."""
    upstream_code, message = _error_fields(last_error) if last_error else ("", "")
    metadata = {
        "close_code": str(code if code is not None else 1006),
        "upstream_code": upstream_code,
    }
    if upstream_code == "rate_limit_exceeded":
        return HealthAgentError(
            ErrorKind.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            f"the upstream is rate limiting requests: {message}",
            retry_after_seconds=retry_delay(message) or 1.0,
            metadata=metadata,
        )
    if code == CLOSE_AUTH_FAILED:
        return HealthAgentError(
            ErrorKind.FAILED_PRECONDITION,
            "UPSTREAM_API_KEY_REJECTED",
            f"the Realtime API rejected the credentials; check {api_key_setting}",
            metadata=metadata,
        )
    if code == CLOSE_BAD_REQUEST:
        return HealthAgentError(
            ErrorKind.FAILED_PRECONDITION,
            "UPSTREAM_REJECTED_REQUEST",
            f"the Realtime API refused the session: {message or 'close 4000'}",
            metadata=metadata,
        )
    if code == CLOSE_SESSION_EXPIRED or upstream_code == "session_expired":
        return HealthAgentError(
            ErrorKind.UNAVAILABLE,
            "UPSTREAM_SESSION_EXPIRED",
            "the Realtime session reached its maximum duration"
            + (" in the middle of the answer" if mid_turn else ""),
            metadata=metadata,
        )
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_STREAM_TRUNCATED" if mid_turn else "UPSTREAM_UNAVAILABLE",
        "the Realtime connection closed"
        + (" before the answer was complete" if mid_turn else "")
        + (f" ({message})" if message else ""),
        metadata=metadata,
    )


def _failed_response(response: dict[str, Any], default_retry: float) -> HealthAgentError:
    details = response.get("status_details") or {}
    error = details.get("error") or {}
    code = str(error.get("code") or details.get("reason") or "failed")
    message = str(error.get("message") or "the upstream failed the response")
    metadata = {"upstream_code": code, "response_status": str(response.get("status"))}
    if code == "rate_limit_exceeded":
        return HealthAgentError(
            ErrorKind.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            f"the upstream is rate limiting requests: {message}",
            retry_after_seconds=retry_delay(message) or default_retry,
            metadata=metadata,
        )
    if response.get("status") == "incomplete":
        # Cut short by a limit (max_output_tokens, content filter): an answer that is not whole
        # must not end OK, and retrying the same request would end the same way.
        return HealthAgentError(
            ErrorKind.FAILED_PRECONDITION,
            "UPSTREAM_RESPONSE_INCOMPLETE",
            f"the upstream stopped the answer early ({code})",
            metadata=metadata,
        )
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_RESPONSE_FAILED",
        f"the upstream response ended {response.get('status')}: {message}",
        retry_after_seconds=default_retry,
        metadata=metadata,
    )


@dataclass(slots=True)
class RealtimeTurn:
    """Translates the events of one response; `done` once `response.done` arrived."""

    default_retry_seconds: float = 1.0
    done: bool = False
    last_error: dict[str, Any] | None = None
    output_items: list[dict[str, Any]] = field(default_factory=list)
    call_ids: set[str] = field(default_factory=set)
    response_events: int = 0
    _texts: list[str] = field(default_factory=list)

    def translate(self, event: dict[str, Any]) -> ChatEvent | None:
        """One event in, at most one event out; raises for a failed response."""
        kind = event.get("type")
        if kind == "response.output_text.delta":
            self.response_events += 1
            return TextDelta(event["delta"], event["item_id"])
        if kind == "response.output_text.done":
            self.response_events += 1
            self._texts.append(event["text"])
            return TextDone(event["text"], event["item_id"])
        if kind == "response.function_call_arguments.done":
            self.response_events += 1
            call_id = upstream_id(event["call_id"], "call id")
            self.call_ids.add(call_id)
            return ToolCall(call_id, event["name"], event["arguments"], event.get("item_id", ""))
        if kind == "response.done":
            return self._response_done(event["response"])
        if kind == "error":
            # Not fatal by itself: only a close that follows makes it so.
            self.last_error = event
            code, message = _error_fields(event)
            return Notice(NoticeLevel.WARNING, message, f"Upstream error: {code}")
        if kind in _REPRESENTED:
            if kind.startswith("response."):
                self.response_events += 1
            return None
        if kind == "rate_limits.updated":
            return Passthrough(kind, json.dumps(event, separators=(",", ":")))
        if kind not in _unknown_types_logged:
            _unknown_types_logged.add(str(kind))
            log.warning("unknown upstream event type passed through", event_type=kind)
        return Passthrough(str(kind), json.dumps(event, separators=(",", ":")))

    def _response_done(self, response: dict[str, Any]) -> ResponseDone:
        self.done = True
        if response.get("status") != "completed":
            raise _failed_response(response, self.default_retry_seconds)
        self.output_items = [item for item in response.get("output") or () if item]
        usage = response.get("usage")
        return ResponseDone(
            "\n\n".join(self._texts),
            Usage(
                int(usage.get("input_tokens") or 0),
                int(usage.get("output_tokens") or 0),
                int(usage.get("total_tokens") or 0),
            )
            if usage
            else None,
            bool(self.call_ids),
        )
