"""ChatKit stream events (`chatkit.types.ThreadStreamEvent` as JSON) -> the project's events.

One `ChatKitTurn` per streamed turn. It also decides whether the turn ended cleanly: ChatKit has
no terminal event (the body just ends), so a turn is complete only if every item that was added
was also finished, and something was received at all.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from healthagent_service.domain.events import (
    CONVERSATION_ID,
    ChatEvent,
    Notice,
    NoticeLevel,
    Passthrough,
    Progress,
    ResponseDone,
    SessionStarted,
    TextDelta,
    TextDone,
    ToolCall,
    Usage,
)
from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.upstream.chatkit_effects import (
    ERROR_EFFECT,
    TURN_ERROR_KINDS,
    USAGE_EFFECT,
)
from healthagent_service.upstream.upstream_json import (
    FastDecodeError,
    decode_fast,
    decode_with_json,
    upstream_id,
)

log = structlog.get_logger(__name__)

TEXT_DELTA = "assistant_message.content_part.text_delta"
# Updates whose content the typed events already carry (chunks, then text_done).
_REPRESENTED_UPDATES = frozenset(
    {
        "assistant_message.content_part.added",
        "assistant_message.content_part.done",
    }
)
KNOWN_EVENT_TYPES = frozenset(
    {
        "thread.created",
        "thread.updated",
        "thread.item.added",
        "thread.item.updated",
        "thread.item.done",
        "thread.item.removed",
        "thread.item.replaced",
        "stream_options",
        "progress_update",
        "client_effect",
        "notice",
        "error",
    }
)
_NOTICE_LEVELS = {level.value: level for level in NoticeLevel}
_unknown_types_logged: set[str] = set()


def upstream_stream_error(event: dict[str, Any], retry_after: float) -> HealthAgentError:
    """An `error` event: retryable ones are UNAVAILABLE, the others INTERNAL."""
    allow_retry = bool(event.get("allow_retry"))
    code = str(event.get("code") or "stream.error")
    detail = event.get("message") or "the upstream failed to generate a response"
    return HealthAgentError(
        ErrorKind.UNAVAILABLE if allow_retry else ErrorKind.INTERNAL,
        "UPSTREAM_STREAM_ERROR",
        f"upstream error ({code}): {detail}",
        retry_after_seconds=retry_after,
        metadata={"upstream_code": code, "allow_retry": str(allow_retry).lower()},
    )


def agent_turn_error(data: dict[str, Any], retry_after: float) -> HealthAgentError:
    """A `healthagent.error` effect (upstream/chatkit_effects.py) as the turn's error."""
    kind_name = str(data.get("kind") or "")
    kind = ErrorKind[kind_name] if kind_name in TURN_ERROR_KINDS else ErrorKind.UNAVAILABLE
    metadata = {str(k): str(v) for k, v in (data.get("metadata") or {}).items()}
    withdrawn = [str(item_id) for item_id in data.get("withdrawn_item_ids") or ()]
    if withdrawn:
        metadata["withdrawn_item_ids"] = ",".join(withdrawn)
    delay = data.get("retry_after_seconds")
    retryable = kind in {ErrorKind.UNAVAILABLE, ErrorKind.RESOURCE_EXHAUSTED}
    return HealthAgentError(
        kind,
        str(data.get("reason") or "UPSTREAM_STREAM_ERROR"),
        str(data.get("message") or "the agent server failed the turn"),
        retry_after_seconds=(
            float(delay) if isinstance(delay, int | float) else retry_after if retryable else None
        ),
        metadata=metadata,
    )


def truncated_stream(detail: str, retry_after: float) -> HealthAgentError:
    """The upstream stopped before the answer was complete."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_STREAM_TRUNCATED",
        f"the upstream stream ended before the answer was complete ({detail})",
        retry_after_seconds=retry_after,
    )


def protocol_error(detail: str, retry_after: float) -> HealthAgentError:
    """The upstream sent something that is not the ChatKit protocol."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "UPSTREAM_PROTOCOL_ERROR",
        f"malformed upstream stream: {detail}",
        retry_after_seconds=retry_after,
    )


def _message_text(item: dict[str, Any]) -> str:
    return "".join(
        part.get("text", "")
        for part in item.get("content") or ()
        if part.get("type") == "output_text"
    )


class ChatKitTurn:
    """Translates one turn's events, in order, and checks the turn ends complete.

    Complete means: something arrived, and every assistant message that was added was also
    finished. Other items may legitimately stay open (the SDK leaves a reasoning `workflow` item
    open across a client tool call, to resume it next turn), and a connection cut mid-body is
    caught by the HTTP layer. Texts are kept per item, so an item the upstream removes (a
    guardrail withdrawing an answer) or replaces does not survive in `response_done`.
    """

    __slots__ = (
        "_conversation_known",
        "_events_seen",
        "_open_messages",
        "_retry_after",
        "_session",
        "_texts",
        "_tool_call_pending",
        "_usage",
    )

    def __init__(self, session: SessionStarted, retry_after: float = 1.0) -> None:
        # For a new conversation `session.conversation_id` is empty until `thread.created`.
        self._session = session
        self._conversation_known = bool(session.conversation_id)
        self._open_messages: set[str] = set()
        self._texts: dict[str, str] = {}  # assistant message id -> its whole text, in order
        self._tool_call_pending = False
        self._usage: Usage | None = None
        self._events_seen = 0
        self._retry_after = retry_after

    def start(self) -> SessionStarted | None:
        """The session event to send before any upstream event, if the conversation is known."""
        return self._session if self._conversation_known else None

    def translate(self, data: bytes) -> ChatEvent | None:
        """Translate one event's JSON; None when it has no event of its own to forward."""
        try:
            try:
                event = decode_fast(data)  # `decode_json`, inline: once per relayed chunk
            except FastDecodeError:
                event = decode_with_json(data)
            kind = event["type"]
        # RecursionError: msgspec's, for JSON nested past its limit (decode_fast is inline)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise self._protocol_error(f"event is not a JSON object with a type ({exc})") from None
        self._events_seen += 1
        try:
            if not self._conversation_known:
                return self._start_conversation(kind, event)
            if kind == "thread.item.updated":
                update = event["update"]
                update_type = update["type"]
                if update_type == TEXT_DELTA:
                    return TextDelta(update["delta"], event["item_id"])
                if update_type in _REPRESENTED_UPDATES:
                    return None
                return Passthrough(kind, data.decode())
            if kind == "thread.item.added":
                item = event["item"]
                if item["type"] == "assistant_message":
                    self._open_messages.add(item["id"])
                    return None
                return Passthrough(kind, data.decode())
            if kind == "thread.item.done":
                return self._item_done(event["item"], data)
            if kind == "thread.item.removed":
                self._forget(event["item_id"])
                return Passthrough(kind, data.decode())
            if kind == "thread.item.replaced":
                item = event["item"]
                self._forget(item["id"])
                if item.get("type") == "assistant_message":
                    self._texts[item["id"]] = _message_text(item)
                return Passthrough(kind, data.decode())
            if kind == "progress_update":
                return Progress(event.get("text", ""), event.get("icon") or "")
            if kind == "notice":
                level = _NOTICE_LEVELS.get(event.get("level", ""), NoticeLevel.UNSPECIFIED)
                return Notice(level, event.get("message", ""), event.get("title") or "")
            if kind == "error":
                raise upstream_stream_error(event, self._retry_after)
            if kind == "client_effect":
                return self._effect(event, data)
            if kind not in KNOWN_EVENT_TYPES and kind not in _unknown_types_logged:
                _unknown_types_logged.add(kind)
                log.warning("unknown upstream event type passed through", event_type=kind)
            return Passthrough(kind, data.decode())
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise self._protocol_error(f"{kind} event lacks {exc}") from None

    def _effect(self, event: dict[str, Any], data: bytes) -> ChatEvent | None:
        name = event["name"]
        effect = event.get("data") or {}
        if name == USAGE_EFFECT:
            self._usage = Usage(
                int(effect.get("input_tokens") or 0),
                int(effect.get("output_tokens") or 0),
                int(effect.get("total_tokens") or 0),
            )
            return None
        if name == ERROR_EFFECT:
            raise agent_turn_error(effect, self._retry_after)
        return Passthrough("client_effect", data.decode())

    def _protocol_error(self, detail: str) -> HealthAgentError:
        return protocol_error(detail, self._retry_after)

    def _forget(self, item_id: str) -> None:
        self._open_messages.discard(item_id)
        self._texts.pop(item_id, None)

    def _start_conversation(self, kind: str, event: dict[str, Any]) -> SessionStarted:
        if kind != "thread.created":
            raise self._protocol_error(
                f"a new thread's stream began with {kind!r}, not thread.created"
            )
        # checked before the session event begins the turn's record: nothing half-written
        thread_id = upstream_id(event["thread"]["id"], "thread id")
        if not CONVERSATION_ID.fullmatch(thread_id):
            # it becomes the conversation id, which the caller sends back to continue
            raise self._protocol_error("a thread id of 1-128 characters from A-Z a-z 0-9 _ . : -")
        self._conversation_known = True
        session = self._session
        self._session = SessionStarted(
            session.session_id, thread_id, session.user, session.workflow_id
        )
        return self._session

    def _item_done(self, item: dict[str, Any], data: bytes) -> ChatEvent:
        item_id = item["id"]
        item_type = item["type"]
        if item_type == "assistant_message":
            self._open_messages.discard(item_id)
            text = _message_text(item)
            self._texts[item_id] = text
            return TextDone(text, item_id)
        if item_type == "client_tool_call" and item.get("status") == "pending":
            self._tool_call_pending = True
            return ToolCall(
                upstream_id(item["call_id"], "call id"),
                item["name"],
                json.dumps(item.get("arguments") or {}),
                item_id,
            )
        return Passthrough("thread.item.done", data.decode())

    def finish(self) -> ResponseDone:
        """Called when the body ended; raises if the turn is incomplete."""
        if not self._events_seen:
            raise truncated_stream("no events were received", self._retry_after)
        if self._open_messages:
            raise truncated_stream(
                f"{len(self._open_messages)} assistant message(s) were never finished",
                self._retry_after,
            )
        return ResponseDone("\n\n".join(self._texts.values()), self._usage, self._tool_call_pending)
