"""Records every Chat turn while it streams: the caller's message and an `incomplete` answer
when the conversation is known, then how the answer ended.

Only the session event and the end of the turn touch the database; chunks are collected in
memory, so the per-chunk path pays one list append.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

import structlog

from healthagent_service.errors import HealthAgentError
from healthagent_service.history.models import NewTurn, Role, Status, TurnOutcome
from healthagent_service.history.store import ConversationStore
from healthagent_service.upstream.events import (
    ChatEvent,
    ChatTurn,
    Passthrough,
    ResponseDone,
    SessionStarted,
    TextDelta,
    TextDone,
    ToolCall,
)

log = structlog.get_logger(__name__)


class _Transcript:
    """What the assistant said so far in one turn."""

    __slots__ = ("chunks", "done_texts", "title", "tool_calls", "upstream_id")

    def __init__(self) -> None:
        self.title = ""
        self.done_texts: list[str] = []
        self.chunks: list[str] = []  # of the message still streaming
        self.tool_calls: list[dict[str, Any]] = []
        self.upstream_id = ""

    def outcome(
        self,
        status: Status,
        text: str | None = None,
        *,
        error_reason: str = "",
        usage: dict[str, int] | None = None,
    ) -> TurnOutcome:
        """How the turn ended; `text` defaults to what arrived so far."""
        return TurnOutcome(
            status,
            self.partial_text() if text is None else text,
            self.tool_calls,
            usage,
            error_reason,
            self.upstream_id,
            self.title,
        )

    def partial_text(self) -> str:
        texts = list(self.done_texts)
        if self.chunks:
            texts.append("".join(self.chunks))
        return "\n\n".join(texts)


def _thread_title(event_json: str) -> str:
    """The title in a ChatKit `thread.updated` event (automatic thread titling), if any."""
    try:
        title = json.loads(event_json)["thread"].get("title")
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    return title if isinstance(title, str) else ""


class TurnRecorder:
    """Wraps a turn's event stream and writes the turn to the store."""

    def __init__(self, store: ConversationStore, upstream: str) -> None:
        self._store = store
        self._upstream = upstream
        self._pending: set[asyncio.Task[None]] = set()

    def _new_turn(self, turn: ChatTurn, conversation_id: str, upstream_id: str) -> NewTurn:
        if turn.tool_output is not None:
            return NewTurn(
                conversation_id,
                turn.user,
                self._upstream,
                upstream_id,
                Role.TOOL,
                turn.tool_output.output_json,
                turn.tool_output.call_id,
            )
        return NewTurn(
            conversation_id, turn.user, self._upstream, upstream_id, Role.USER, turn.message or ""
        )

    async def record(
        self, turn: ChatTurn, events: AsyncGenerator[ChatEvent, None]
    ) -> AsyncGenerator[ChatEvent, None]:
        """Yield `events` unchanged, recording the turn on the way."""
        transcript = _Transcript()
        conversation_id = turn.conversation_id or ""
        message_id: str | None = None
        outcome: TurnOutcome | None = None
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    kind = type(event)
                    if kind is TextDelta:
                        transcript.chunks.append(event.text)  # type: ignore[union-attr]
                    elif kind is SessionStarted:
                        assert isinstance(event, SessionStarted)
                        conversation_id = event.conversation_id
                        transcript.upstream_id = event.session_id or event.conversation_id
                        if message_id is None:
                            message_id = await self._store.begin_turn(
                                self._new_turn(turn, conversation_id, transcript.upstream_id)
                            )
                    elif kind is TextDone:
                        assert isinstance(event, TextDone)
                        transcript.done_texts.append(event.text)
                        transcript.chunks.clear()
                    elif kind is ToolCall:
                        assert isinstance(event, ToolCall)
                        transcript.tool_calls.append(
                            {
                                "call_id": event.call_id,
                                "name": event.name,
                                "arguments": event.arguments_json,
                            }
                        )
                    elif kind is Passthrough:
                        assert isinstance(event, Passthrough)
                        if event.type == "thread.updated":
                            transcript.title = _thread_title(event.json) or transcript.title
                    elif kind is ResponseDone:
                        assert isinstance(event, ResponseDone)
                        usage = event.usage
                        outcome = transcript.outcome(
                            Status.COMPLETE,
                            event.text,
                            usage={
                                "input_tokens": usage.input_tokens,
                                "output_tokens": usage.output_tokens,
                                "total_tokens": usage.total_tokens,
                            }
                            if usage
                            else None,
                        )
                    yield event
        except HealthAgentError as error:
            text = transcript.partial_text()
            status = Status.INCOMPLETE if text or transcript.tool_calls else Status.FAILED
            outcome = transcript.outcome(status, text, error_reason=error.reason)
            if message_id is None and conversation_id:
                # Refused before it began (a 429 on a known conversation, say): still recorded.
                message_id = await self._begin_quietly(turn, conversation_id, transcript)
            raise
        except Exception:
            outcome = transcript.outcome(Status.INCOMPLETE, error_reason="INTERNAL")
            raise
        finally:
            if message_id is not None:
                if outcome is None:  # the caller left: cancelled, deadline, disconnect
                    outcome = transcript.outcome(Status.INCOMPLETE, error_reason="CANCELLED")
                # Shielded: a cancelled call still gets its turn written down.
                write = asyncio.ensure_future(
                    self._store.finish_turn(turn.user, conversation_id, message_id, outcome)
                )
                self._pending.add(write)
                write.add_done_callback(self._finished)
                await asyncio.shield(write)

    async def _begin_quietly(
        self, turn: ChatTurn, conversation_id: str, transcript: _Transcript
    ) -> str | None:
        try:
            if not await self._store.has_conversation(turn.user, conversation_id):
                return None  # only conversations already recorded for this user
            return await self._store.begin_turn(
                self._new_turn(turn, conversation_id, transcript.upstream_id)
            )
        except Exception as exc:  # the original error matters more to the caller
            log.warning("could not record a refused turn", error=str(exc))
            return None

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not record the end of a turn", error=str(task.exception()))

    async def drain(self) -> None:
        """Wait for turn records still being written (at shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
