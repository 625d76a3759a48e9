"""A bounded pool of live upstream sessions, one per `SessionOptions`.

- A session is reused until `refresh_fraction` of its lifetime has passed, then re-minted.
- Concurrent requests for the same options mint once (single flight); a caller that gives up
  waiting does not cancel the mint the others are waiting for.
- At most `max_size` sessions, and at most `max_bytes` of them (their options, state variables
  included, and secrets: each distinct set of options is a session of its own), are kept; the
  least recently used one is dropped first.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from healthagent_service.domain.events import MintedSession, SessionOptions

Mint = Callable[[SessionOptions], Awaitable[MintedSession]]
OnMinted = Callable[[SessionOptions, MintedSession], Awaitable[None]]
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# what a pooled entry costs besides its strings: the tuple, the dataclass, the dict slot
_ENTRY_OVERHEAD_BYTES = 600


def entry_bytes(options: SessionOptions, session: MintedSession) -> int:
    """About what keeping `session` for `options` holds in memory, in bytes."""
    size = _ENTRY_OVERHEAD_BYTES + len(options.user) + len(options.workflow_id)
    size += len(options.version or "")
    for name, value in options.state_variables:
        size += len(name) + len(value) + 120  # two strings and their pair
    return size + len(session.id) + len(session.client_secret) + len(session.workflow_id)


@dataclass(slots=True)
class PoolStats:
    """Counters for metrics and tests."""

    hits: int = 0
    misses: int = 0
    mints: int = 0
    evictions: int = 0
    refreshes: int = 0


class SessionPool:
    """Hands out a live session for given options, minting only when needed."""

    def __init__(
        self,
        mint: Mint,
        *,
        max_size: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        refresh_fraction: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
        on_minted: OnMinted | None = None,
    ) -> None:
        self._mint = mint
        # Called after every mint, before the session is handed out (e.g. to record it).
        self.on_minted = on_minted
        self._max_size = max_size
        self._max_bytes = max_bytes
        self.bytes = 0  # what the pooled entries hold, by `entry_bytes`
        self._refresh_fraction = refresh_fraction
        self._clock = clock
        self._sessions: OrderedDict[SessionOptions, MintedSession] = OrderedDict()
        self._inflight: dict[SessionOptions, asyncio.Task[MintedSession]] = {}
        # When each user last logged out: a mint that began before then is never handed out.
        self._revoked_at: dict[str, float] = {}
        self.stats = PoolStats()

    def __len__(self) -> int:
        return len(self._sessions)

    def is_fresh(self, session: MintedSession) -> bool:
        """True while less than `refresh_fraction` of the session's lifetime has passed."""
        age = self._clock() - session.minted_at_monotonic
        return age < session.lifetime_seconds * self._refresh_fraction

    def pooled(self, options: SessionOptions) -> MintedSession | None:
        """The pooled session for `options` while it is fresh (a hit), else None."""
        session = self._sessions.get(options)
        if session is not None and self.is_fresh(session):
            self._sessions.move_to_end(options)
            self.stats.hits += 1
            return session
        return None

    async def get(self, options: SessionOptions) -> MintedSession:
        """A fresh session for `options`: pooled if possible, else minted once for all callers."""
        session = self.pooled(options)
        if session is not None:
            return session
        if self._drop(options) is not None:  # pooled, but due for a refresh
            self.stats.refreshes += 1
        self.stats.misses += 1
        for _ in range(3):
            task = self._inflight.get(options)
            if task is None:
                task = asyncio.create_task(self._mint_and_keep(options))
                task.add_done_callback(_retrieve_exception)
                self._inflight[options] = task
            try:
                # shield: one waiter's cancellation must not cancel the mint the others share.
                return await asyncio.shield(task)
            except _RevokedWhileMinting:
                continue  # the user logged out meanwhile: that session is dead, mint anew
        raise RuntimeError("sessions keep being revoked while minting")

    async def _mint_and_keep(self, options: SessionOptions) -> MintedSession:
        started = self._clock()
        try:
            session = await self._mint(options)
            self.stats.mints += 1
            if self.on_minted is not None:
                await self.on_minted(options, session)
            if self._revoked_at.get(options.user, float("-inf")) >= started:
                raise _RevokedWhileMinting
            self._drop(options)
            self._sessions[options] = session
            self.bytes += entry_bytes(options, session)
            while len(self._sessions) > self._max_size or (
                self.bytes > self._max_bytes and len(self._sessions) > 1
            ):
                self._drop(next(iter(self._sessions)))  # the least recently used
                self.stats.evictions += 1
            return session
        finally:
            del self._inflight[options]

    def evict(self, options: SessionOptions, session_id: str) -> bool:
        """Drop the pooled session for `options` if it is still `session_id` (e.g. after a 401)."""
        current = self._sessions.get(options)
        if current is None or current.id != session_id:
            return False
        self._drop(options)
        self.stats.evictions += 1
        return True

    def _drop(self, options: SessionOptions) -> MintedSession | None:
        session = self._sessions.pop(options, None)
        if session is not None:
            self.bytes -= entry_bytes(options, session)
        return session

    def sessions_of(self, user: str) -> list[tuple[SessionOptions, MintedSession]]:
        """Every pooled session minted for `user`."""
        return [(o, s) for o, s in self._sessions.items() if o.user == user]

    def evict_user(self, user: str) -> list[MintedSession]:
        """Drop every pooled session of `user` (logout); return them."""
        self._revoked_at[user] = self._clock()
        dropped = self.sessions_of(user)
        for options, _ in dropped:
            self._drop(options)
            self.stats.evictions += 1
        return [session for _, session in dropped]

    async def close(self) -> None:
        """Cancel mints in flight and forget every session."""
        for task in list(self._inflight.values()):
            task.cancel()
        self._sessions.clear()
        self.bytes = 0


def _retrieve_exception(task: asyncio.Task[MintedSession]) -> None:
    # Every waiter may have left; mark the failure as seen so asyncio does not warn about it.
    if not task.cancelled():
        task.exception()


class _RevokedWhileMinting(Exception):  # noqa: N818 - a signal inside the pool
    """The user's sessions were revoked while this one was being minted."""
