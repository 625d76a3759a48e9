"""Logout: revoke a user's upstream sessions everywhere they live.

The store knows every session any replica minted; this replica's pools and sockets are cleared
at once, and the other replicas hear about it through the store (PostgreSQL NOTIFY) and clear
theirs, so a revoked secret is never handed out again.
"""

from __future__ import annotations

import structlog

from healthagent_service.errors import HealthAgentError
from healthagent_service.history.store import ConversationStore
from healthagent_service.upstream.chatkit import ChatKitUpstream
from healthagent_service.upstream.realtime import RealtimeUpstream

log = structlog.get_logger(__name__)


class SessionRevoker:
    """Revokes sessions in the store, upstream, and in every replica's memory."""

    def __init__(
        self, store: ConversationStore, chatkit: ChatKitUpstream, realtime: RealtimeUpstream
    ) -> None:
        self._store = store
        self._chatkit = chatkit
        self._realtime = realtime

    async def start(self) -> None:
        """Listen for revocations announced by other replicas."""
        await self._store.listen_revocations(self._announced)

    async def _announced(self, user: str) -> None:
        dropped, closed = self.forget(user)
        if dropped or closed:
            log.info(
                "revocation from another replica applied",
                user=user,
                dropped_sessions=dropped,
                closed_sockets=closed,
            )

    def forget(self, user: str) -> tuple[int, int]:
        """Drop the user's pooled sessions and close their sockets in this process."""
        dropped = len(self._chatkit.pool.evict_user(user))
        return dropped, self._realtime.close_user(user)

    async def revoke(self, user: str) -> tuple[int, int]:
        """Revoke everything of `user`; return (sessions revoked, sockets closed here)."""
        revoked = await self._store.revoke_sessions(user)
        _, closed = self.forget(user)
        for session_id, kind in revoked:
            if kind != "chatkit" or self._chatkit.self_hosted:
                continue  # Realtime secrets cannot be cancelled; they only open connections
            try:
                await self._chatkit.cancel(session_id)
            except HealthAgentError as error:
                # Recorded revoked and out of every pool already; the upstream will expire it.
                log.warning(
                    "could not cancel a session upstream",
                    session_id=session_id,
                    reason=error.reason,
                )
        if self._chatkit.mints_agent_tokens:
            # the agent server checks tokens itself: it must hear of the logout, or the
            # user's tokens keep working; a failure here fails the call, to be retried
            await self._chatkit.revoke_agent_tokens(user)
        await self._store.announce_revocation(user)
        log.info("sessions revoked", user=user, revoked=len(revoked), closed_sockets=closed)
        return len(revoked), closed
