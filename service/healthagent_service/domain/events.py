"""The project's own typed events and requests, independent of any wire protocol or protobuf.

Adapters produce these; `api/converter.py` is the one place that turns them into protobuf.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import NamedTuple, Protocol

import msgspec

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_seconds_and_nanos(moment: datetime) -> tuple[int, int]:
    """An aware datetime as a protobuf Timestamp's seconds and nanos, exactly (a third of the
    cost of `Timestamp.FromDatetime`)."""
    since_epoch = moment - _EPOCH
    return since_epoch.days * 86_400 + since_epoch.seconds, since_epoch.microseconds * 1_000


class NoticeLevel(Enum):
    """Severity of a notice, as ChatKit names it."""

    UNSPECIFIED = ""
    INFO = "info"
    WARNING = "warning"
    DANGER = "danger"


# What a conversation id may be (use `fullmatch`: `$` would also match before a trailing
# newline). Callers send it back to continue a conversation, so an upstream's thread id must be
# one too.
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """The conversation this turn belongs to is known."""

    session_id: str
    conversation_id: str
    user: str
    workflow_id: str


class TextDelta(msgspec.Struct, gc=False):
    """Assistant text to append to item `item_id` (treat it as immutable, like the others).

    A msgspec struct, built in C (a frozen dataclass's `__init__` is Python): one is made per
    relayed chunk, and two strings cannot form a cycle, so the garbage collector need not track
    it. As a frozen slotted dataclass it cost 3.4% more instructions an unpaced chunk, counted
    twice each way on a quiet machine (`bench.instructions`: 116,391 and 116,080 against 112,074
    and 112,395; the bare server 86,814-87,119 throughout; issue 25)."""

    text: str
    item_id: str


@dataclass(frozen=True, slots=True)
class TextDone:
    """Assistant message `item_id` is complete; `text` is all of it."""

    text: str
    item_id: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The assistant asks the caller to run a client tool."""

    call_id: str
    name: str
    arguments_json: str
    item_id: str


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress text to show while the answer is prepared."""

    text: str
    icon: str = ""


@dataclass(frozen=True, slots=True)
class Notice:
    """A message for the user that is not part of the answer."""

    level: NoticeLevel
    message: str
    title: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as reported by the upstream."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """The turn is complete."""

    text: str
    usage: Usage | None = None
    awaiting_tool_output: bool = False


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An upstream event with no typed counterpart, kept as its JSON text."""

    type: str
    json: str


ChatEvent = (
    SessionStarted
    | TextDelta
    | TextDone
    | ToolCall
    | Progress
    | Notice
    | ResponseDone
    | Passthrough
)


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """The caller's answer to a client tool call."""

    call_id: str
    output_json: str


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One validated user turn: exactly one of `message` and `tool_output` is set."""

    user: str
    device_id: str
    message: str | None = None
    tool_output: ToolOutput | None = None
    conversation_id: str | None = None


class SessionOptions(NamedTuple):
    """What a minted session is for; identical options share a pooled session.

    A named tuple rather than a frozen dataclass: it is built, hashed and compared on every
    MintSession and Chat turn, and a tuple does all three in C (a third of the time)."""

    user: str
    workflow_id: str
    version: str | None = None
    # Sorted (key, JSON value text) pairs, so the options are hashable.
    state_variables: tuple[tuple[str, str], ...] = ()
    ttl_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class MintedSession:
    """An upstream session and its secret. Never log `client_secret`."""

    id: str
    client_secret: str
    expires_at: datetime
    workflow_id: str
    user: str
    # When it was minted, by the pool's clock (monotonic seconds), to refresh it in time.
    minted_at_monotonic: float
    lifetime_seconds: float
    # `expires_at` since the epoch, exactly, as a protobuf Timestamp holds it: worked out once,
    # since a pooled session is handed out by many MintSession calls
    expires_at_seconds: int = field(init=False, repr=False, compare=False)
    expires_at_nanos: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seconds, nanos = epoch_seconds_and_nanos(self.expires_at)
        object.__setattr__(self, "expires_at_seconds", seconds)
        object.__setattr__(self, "expires_at_nanos", nanos)

    def __repr__(self) -> str:  # keep the secret out of reprs, logs and tracebacks
        return f"MintedSession(id={self.id!r}, user={self.user!r}, expires_at={self.expires_at})"


class ChatUpstream(Protocol):
    """What `Chat` needs from an upstream: stream one turn, ending with `ResponseDone`."""

    def chat(self, turn: ChatTurn) -> AsyncGenerator[ChatEvent, None]: ...
