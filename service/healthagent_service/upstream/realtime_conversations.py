"""The conversations this process holds: each one's transcript (whole turns only), the tool
calls it waits on, and its socket while it lasts. A conversation this process does not hold is
loaded from the history store, so any replica can continue any conversation by replaying it."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from healthagent_service.domain.events import ChatTurn
from healthagent_service.errors import conversation_not_found
from healthagent_service.upstream.realtime_socket import RealtimeSocket

# (user, conversation id) -> (replayable items, pending call ids), or None if not recorded.
TranscriptLoader = Callable[[str, str], Awaitable[tuple[list[dict[str, Any]], set[str]] | None]]


@dataclass(eq=False)
class RealtimeConversation:
    """A conversation held by this service: its transcript, and its socket while it lasts."""

    id: str
    user: str
    transcript: list[dict[str, Any]] = field(default_factory=list)
    pending_call_ids: set[str] = field(default_factory=set)
    socket: RealtimeSocket | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    revoked: bool = False  # set by logout; a turn under way ends instead of reconnecting


class Conversations:
    """At most `max_conversations`, least recently used first out."""

    def __init__(
        self,
        *,
        max_conversations: int,
        idle_seconds: float,
        transcripts: TranscriptLoader | None,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self._max_conversations = max_conversations
        self._idle_seconds = idle_seconds
        # Where conversations this process does not hold come from (the history store).
        self._transcripts = transcripts
        self._spawn = spawn  # closes a socket in the background
        self._held: OrderedDict[str, RealtimeConversation] = OrderedDict()

    async def for_turn(self, turn: ChatTurn) -> RealtimeConversation:
        """The turn's conversation: a new one, one held here, or one loaded from the store;
        NOT_FOUND when none is the turn's user's."""
        if turn.conversation_id is None:
            conversation = RealtimeConversation(
                id=f"rtconv_{secrets.token_hex(12)}", user=turn.user
            )
            self._held[conversation.id] = conversation
            self._evict_idle()
            return conversation
        known = self._held.get(turn.conversation_id)
        if known is None and self._transcripts is not None:
            loaded = await self._transcripts(turn.user, turn.conversation_id)
            if loaded is not None:
                known = RealtimeConversation(
                    id=turn.conversation_id,
                    user=turn.user,
                    transcript=loaded[0],
                    pending_call_ids=loaded[1],
                )
                self._held[known.id] = known
        if known is None or known.user != turn.user:
            raise conversation_not_found(turn.conversation_id)
        self._held.move_to_end(known.id)
        return known

    def _evict_idle(self) -> None:
        """Keep at most `max_conversations`, dropping the least recently used that are not in
        the middle of a turn (their transcripts stay in the history store)."""
        excess = len(self._held) - self._max_conversations
        for conversation in list(self._held.values()):
            if excess <= 0:
                break
            if conversation.lock.locked():
                continue
            del self._held[conversation.id]
            if conversation.socket is not None:
                self._spawn(conversation.socket.close())
            excess -= 1

    async def catch_up(self, conversation: RealtimeConversation) -> None:
        """Another replica may have carried this conversation on since this one last held it:
        if the store has more turns than memory, take the store's and replay them."""
        if self._transcripts is None:
            return
        loaded = await self._transcripts(conversation.user, conversation.id)
        if loaded is None or _turns(loaded[0]) <= _turns(conversation.transcript):
            return
        conversation.transcript, conversation.pending_call_ids = loaded
        if conversation.socket is not None:
            self._spawn(conversation.socket.close())
            conversation.socket = None

    def close_user(self, user: str) -> int:
        """Close the sockets of `user`'s conversations (logout); return how many."""
        closed = 0
        for conversation in list(self._held.values()):
            if conversation.user != user:
                continue
            conversation.revoked = True
            # Forget it here; a later turn reloads it from the store onto a fresh session.
            del self._held[conversation.id]
            if conversation.socket is not None:
                self._spawn(conversation.socket.close())
                conversation.socket = None
                closed += 1
        return closed

    def reap(self, now: float) -> None:
        """Close the sockets of conversations idle too long (as of `now`, monotonic) that are
        not in the middle of a turn."""
        for conversation in self._held.values():
            socket = conversation.socket
            if (
                socket is not None
                and not conversation.lock.locked()
                and now - socket.last_used > self._idle_seconds
            ):
                conversation.socket = None
                self._spawn(socket.close())

    def socket_of(self, conversation_id: str) -> RealtimeSocket | None:
        """The socket a conversation holds now, if it is held here."""
        conversation = self._held.get(conversation_id)
        return conversation.socket if conversation else None

    def sockets(self) -> list[RealtimeSocket]:
        """Every socket a conversation holds now."""
        return [c.socket for c in self._held.values() if c.socket]


def _turns(items: list[dict[str, Any]]) -> int:
    """How many caller turns (user messages and tool outputs) a transcript holds."""
    return sum(
        1
        for item in items
        if item.get("role") == "user" or item.get("type") == "function_call_output"
    )
