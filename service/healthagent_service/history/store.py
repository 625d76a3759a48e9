"""The store interface both backends implement, and what they share (page tokens, ids)."""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from healthagent_service.domain.events import CONVERSATION_ID
from healthagent_service.errors import ErrorKind, FieldViolation, HealthAgentError, invalid_argument
from healthagent_service.history.models import (
    Conversation,
    ConversationPage,
    NewTurn,
    TurnOutcome,
)
from healthagent_service.ids import UniqueIds

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# ours are about 200 characters (a user id of 256 four-byte characters: under 2,000)
MAX_PAGE_TOKEN_CHARS = 2048
# what a token may name: both backends store and compare times in this range
_OLDEST, _NEWEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)
RevocationListener = Callable[[str], Coroutine[Any, Any, None]]


def now() -> datetime:
    return datetime.now(UTC)


# "hamsg_" and 24 hex digits: unique across processes and replicas sharing a database
new_message_id = UniqueIds("hamsg_", counter_digits=8)


def storable(text: str) -> str:
    """`text` as both backends store it alike: a NUL (which PostgreSQL text cannot hold) and
    a lone surrogate (not Unicode, which neither can encode) become U+FFFD. For what the
    upstream says; what callers send with either is refused."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _bad_page_token() -> HealthAgentError:
    return invalid_argument(
        [FieldViolation("page_token", "is not a token from a previous ListConversations call")]
    )


def encode_page_token(user: str, updated_at: datetime, conversation_id: str) -> str:
    """An opaque token for the page after (updated_at, id), bound to the user (AIP-158)."""
    raw = json.dumps({"u": user, "t": updated_at.isoformat(), "i": conversation_id})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(user: str, token: str) -> tuple[datetime, str] | None:
    """(updated_at, id) from a token; INVALID_ARGUMENT if it is not one of ours for `user`."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise _bad_page_token()
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if raw["u"] != user:
            raise ValueError("token of another user")
        updated_at, conversation_id = datetime.fromisoformat(raw["t"]), raw["i"]
        # Only what encode_page_token writes: an aware time the stores can hold, taken to UTC
        # (SQLite compares the text), and a conversation id.
        if updated_at.tzinfo is None or not _OLDEST <= updated_at <= _NEWEST:
            raise ValueError("time out of range")
        if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
            raise ValueError("not a conversation id")
        return updated_at.astimezone(UTC), conversation_id
    except (
        ValueError,
        KeyError,
        TypeError,
        binascii.Error,
        RecursionError,  # deeply nested JSON
        OverflowError,
    ):
        raise _bad_page_token() from None


def history_unavailable(exc: BaseException) -> HealthAgentError:
    """The history store cannot be reached or written now (a lost database connection, a
    full disk): refused, to be retried."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "HISTORY_UNAVAILABLE",
        f"the conversation history cannot be reached ({type(exc).__name__}); retry shortly",
        retry_after_seconds=1.0,
    )


def check_page_size(page_size: int) -> int:
    """AIP-158: 0 means the default, larger than the maximum is capped, negative is invalid."""
    if page_size < 0:
        raise invalid_argument([FieldViolation("page_size", "must not be negative")])
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class ConversationStore(ABC):
    """Conversations, their messages, and upstream sessions. Every write is one transaction.
    A store that cannot be reached raises `history_unavailable`'s error."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and run pending migrations."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:  # noqa: B027 - an embedded store has nothing to reach
        """Raise when the store cannot be reached now (for health)."""

    @abstractmethod
    async def schema_version(self) -> int:
        """The latest applied migration."""

    @abstractmethod
    async def has_conversation(self, user: str, conversation_id: str) -> bool:
        """True if the user has a stored conversation with this id. Conversations are keyed by
        (user, id): upstream thread ids are only unique per user (the SDK's are 8 hex digits),
        so two users' threads may share an id without ever meeting."""

    @abstractmethod
    async def begin_turn(self, turn: NewTurn) -> str:
        """Record the caller's message and an `incomplete` assistant message (creating the
        user's conversation if new); return the assistant message's id."""

    @abstractmethod
    async def finish_turn(
        self, user: str, conversation_id: str, message_id: str, outcome: TurnOutcome
    ) -> None:
        """Record how the assistant message ended."""

    @abstractmethod
    async def get_conversation(self, user: str, conversation_id: str) -> Conversation | None:
        """The user's conversation with its messages in order, or None."""

    @abstractmethod
    async def list_conversations(
        self, user: str, page_size: int, page_token: str
    ) -> ConversationPage:
        """The user's conversations, most recently updated first."""

    @abstractmethod
    async def delete_conversation(self, user: str, conversation_id: str) -> bool:
        """Delete the user's conversation and its messages; False if there was none."""

    @abstractmethod
    async def record_session(
        self, session_id: str, user: str, kind: str, expires_at: datetime
    ) -> None:
        """Remember a minted upstream session."""

    @abstractmethod
    async def revoke_sessions(self, user: str) -> list[tuple[str, str]]:
        """Mark the user's unexpired sessions revoked; return their (id, kind)."""

    @abstractmethod
    async def is_revoked(self, session_id: str) -> bool:
        """True if the session was revoked."""

    async def listen_revocations(self, listener: RevocationListener) -> None:
        """Call `listener(user)` when another process revokes a user's sessions."""
        del listener  # a single-process backend has no one else to hear from

    async def announce_revocation(self, user: str) -> None:
        """Tell other processes sharing this store that `user`'s sessions were revoked."""
        del user
