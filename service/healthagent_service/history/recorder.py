"""Records every Chat turn while it streams: the caller's message and an `incomplete` answer
when the conversation is known, then how the answer ended.

Only the session event and the end of the turn touch the database; chunks are collected in
memory, so the per-chunk path pays one list append. The relay feeds a `TurnRecording` as it
goes instead of reading the events through a generator of the recorder's: a generator layer
costs every chunk a resumption each way (docs/decisions/0009-per-call-python.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Any

import structlog

from healthagent_service.domain.events import (
    ChatEvent,
    ChatTurn,
    Passthrough,
    ResponseDone,
    SessionStarted,
    TextDelta,
    TextDone,
    ToolCall,
)
from healthagent_service.errors import HealthAgentError
from healthagent_service.history.models import NewTurn, Role, Status, TurnOutcome
from healthagent_service.history.store import ConversationStore, storable

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
        """How the turn ended; `text` defaults to what arrived so far. Upstream text is made
        `storable`, so that both backends keep the same."""
        return TurnOutcome(
            status,
            storable(self.partial_text() if text is None else text),
            [
                {key: storable(str(value)) for key, value in call.items()}
                for call in self.tool_calls
            ],
            usage,
            error_reason,
            storable(self.upstream_id),
            storable(self.title),
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
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return ""
    return title if isinstance(title, str) else ""


class TurnRecorder:
    """Writes turns to the store as they stream: `start` one `TurnRecording` per turn."""

    def __init__(self, store: ConversationStore, upstream: str) -> None:
        self._store = store
        self._upstream = upstream
        self._pending: set[asyncio.Task[None]] = set()

    def start(self, turn: ChatTurn) -> TurnRecording:
        """Begin recording `turn`: feed it every event relayed, then `finish` it."""
        return TurnRecording(self, turn)

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

    def _write_end(
        self, turn: ChatTurn, conversation_id: str, message_id: str, outcome: TurnOutcome
    ) -> asyncio.Future[None]:
        """Write how the turn ended, as a task of its own: a cancelled caller cannot stop it,
        and `drain` waits for it at shutdown."""
        write = asyncio.ensure_future(
            self._store.finish_turn(turn.user, conversation_id, message_id, outcome)
        )
        self._pending.add(write)
        write.add_done_callback(self._finished)
        return write

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, HealthAgentError):  # the store is down: the answer stands
            log.warning("could not record the end of a turn", reason=error.reason)
        elif error is not None:
            log.error("could not record the end of a turn", error=repr(error))

    async def drain(self) -> None:
        """Wait for turn records still being written (at shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


class TurnRecording:
    """One turn being recorded while it is relayed. The relay hands it every event before
    sending it on: `add_chunk` with each text delta's text (the per-chunk path: a list
    append, no call of this class), `observe` with every other event; `upstream_failed` with
    what the upstream raised, if it did; then `finish`, whatever happened."""

    __slots__ = (
        "_conversation_id",
        "_message_id",
        "_outcome",
        "_recorder",
        "_turn",
        "add_chunk",
        "transcript",
    )

    def __init__(self, recorder: TurnRecorder, turn: ChatTurn) -> None:
        self._recorder = recorder
        self._turn = turn
        self.transcript = _Transcript()
        self.add_chunk = self.transcript.chunks.append
        self._conversation_id = turn.conversation_id or ""
        self._message_id: str | None = None
        self._outcome: TurnOutcome | None = None

    async def observe(self, event: ChatEvent) -> None:
        """Note an event other than a text delta (the session event begins the record)."""
        transcript = self.transcript
        kind = type(event)
        if kind is SessionStarted:
            assert isinstance(event, SessionStarted)
            self._conversation_id = event.conversation_id
            transcript.upstream_id = event.session_id or event.conversation_id
            if self._message_id is None:
                self._message_id = await self._begin()
        elif kind is TextDelta:
            assert isinstance(event, TextDelta)
            self.add_chunk(event.text)
        elif kind is TextDone:
            assert isinstance(event, TextDone)
            transcript.done_texts.append(event.text)
            transcript.chunks.clear()
        elif kind is ToolCall:
            assert isinstance(event, ToolCall)
            transcript.tool_calls.append(
                {"call_id": event.call_id, "name": event.name, "arguments": event.arguments_json}
            )
        elif kind is Passthrough:
            assert isinstance(event, Passthrough)
            if event.type == "thread.updated":
                transcript.title = _thread_title(event.json) or transcript.title
        elif kind is ResponseDone:
            assert isinstance(event, ResponseDone)
            usage = event.usage
            self._outcome = transcript.outcome(
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

    async def upstream_failed(self, error: BaseException) -> None:
        """The upstream raised `error` (a `HealthAgentError`, or anything else: INTERNAL)."""
        transcript = self.transcript
        if not isinstance(error, HealthAgentError):
            self._outcome = transcript.outcome(Status.INCOMPLETE, error_reason="INTERNAL")
            return
        # text an output guardrail withdrew is not the assistant's answer: not kept
        withdrawn = "withdrawn_item_ids" in error.metadata
        text = "" if withdrawn else transcript.partial_text()
        status = Status.INCOMPLETE if text or transcript.tool_calls else Status.FAILED
        self._outcome = transcript.outcome(status, text, error_reason=error.reason)
        if self._message_id is None and self._conversation_id:
            # Refused before it began (a 429 on a known conversation, say): still recorded.
            self._message_id = await self._begin_quietly()

    async def finish(self, cut_reason: str = "CANCELLED") -> None:
        """Write down how the turn ended: as observed, or cut off for `cut_reason` (the caller
        left, its deadline passed, the server shut down, the caller stopped reading). A write
        that fails is logged, not raised: the caller's answer does not depend on it."""
        if self._message_id is None:
            return
        outcome = self._outcome
        if outcome is None:
            outcome = self.transcript.outcome(Status.INCOMPLETE, error_reason=cut_reason)
        write = self._recorder._write_end(
            self._turn, self._conversation_id, self._message_id, outcome
        )
        # Shielded: a cancelled call still gets its turn written down.
        with contextlib.suppress(Exception):
            await asyncio.shield(write)

    def _begin(self) -> Awaitable[str]:
        """Write the caller's message and an `incomplete` answer; the answer's message id."""
        recorder = self._recorder
        return recorder._store.begin_turn(
            recorder._new_turn(self._turn, self._conversation_id, self.transcript.upstream_id)
        )

    async def _begin_quietly(self) -> str | None:
        try:
            store = self._recorder._store
            if not await store.has_conversation(self._turn.user, self._conversation_id):
                return None  # only conversations already recorded for this user
            return await self._begin()
        except Exception as exc:  # the original error matters more to the caller
            log.warning("could not record a refused turn", error=str(exc))
            return None
