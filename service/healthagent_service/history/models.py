"""The stored records, independent of the database and of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """Who a message is from."""

    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"  # the caller's answer to a tool call


class Status(StrEnum):
    """How a message ended."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # cut by a cancel or an upstream failure, or still streaming
    FAILED = "failed"  # the upstream refused the turn before any text


@dataclass(frozen=True, slots=True)
class Message:
    """One stored message."""

    id: str
    conversation_id: str
    seq: int
    role: Role
    text: str
    status: Status
    created_at: datetime
    updated_at: datetime
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {call_id, name, arguments}
    tool_call_id: str = ""  # for role TOOL: the call it answers
    usage: dict[str, int] | None = None
    error_reason: str = ""


@dataclass(frozen=True, slots=True)
class Conversation:
    """One stored conversation; `messages` is filled only when asked for."""

    id: str
    user: str
    upstream: str  # "chatkit" or "realtime"
    upstream_id: str  # the ChatKit thread id or the latest Realtime session id
    title: str
    created_at: datetime
    updated_at: datetime
    messages: list[Message] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NewTurn:
    """What a turn starts with: the caller's message, recorded before the answer streams."""

    conversation_id: str
    user: str
    upstream: str
    upstream_id: str
    role: Role
    text: str
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    """How the assistant's side of a turn ended."""

    status: Status
    text: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] | None = None
    error_reason: str = ""
    upstream_id: str = ""  # the session that answered, when it changed (Realtime reconnects)
    title: str = ""  # a title the upstream gave the conversation during the turn


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One page of conversations, newest first."""

    conversations: list[Conversation]
    next_page_token: str
