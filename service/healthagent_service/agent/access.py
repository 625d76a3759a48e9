"""Who may call the agent server, and for which end user.

- The HealthAgent service sends its credential (the `HEALTHAGENT_CHATKIT_AUTH_HEADER` header,
  compared in constant time) and names the end user in `X-HealthAgent-User`; only such a request
  may name a user.
- An app or a web ChatKit UI sends `Authorization: Bearer <token>`, a user token MintSession
  issued (`security/agent_tokens.py`); the user is the token's, and a token issued before the
  user's last logout is refused.
- With no service credential configured, the server listens on loopback only (`check_exposure`),
  and trusts `X-HealthAgent-User` from any local process, like the service's own port without
  authentication.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from urllib.parse import unquote

from healthagent_service.agent.database import AgentDatabase
from healthagent_service.agent.thread_store import RequestContext
from healthagent_service.security.agent_tokens import InvalidAgentToken, verify_agent_token
from healthagent_service.upstream.chatkit import FORWARDED_USER_HEADER

MAX_USER_LENGTH = 256


class AccessDenied(Exception):  # noqa: N818 - a verdict, like HTTP's
    """The request may not proceed: `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_TRUSTED_CLOCK_SKEW_SECONDS = 86_400.0


class TokenRevocations:
    """The moment before which a user's tokens are void, in the agent's database, so every
    agent server sharing it refuses them."""

    def __init__(self, database: AgentDatabase) -> None:
        self._database = database

    async def revoke(self, user: str, at: float | None = None) -> float:
        """Void the user's tokens issued up to `at`: the service's clock, which also stamped
        the tokens' `iat`, so the two compare whatever the agent server's own clock says
        (this one's when the service sent none, or one a day away from it)."""
        moment = time.time()
        if at is not None and abs(at - moment) < _TRUSTED_CLOCK_SKEW_SECONDS:
            moment = at
        await self._database.execute(
            "INSERT INTO agent_token_revocations (user_id, revoked_before) VALUES (?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET revoked_before = excluded.revoked_before",
            user,
            moment,
        )
        return moment

    async def revoked_before(self, user: str) -> float | None:
        rows = await self._database.fetch(
            "SELECT revoked_before FROM agent_token_revocations WHERE user_id = ?", user
        )
        return float(rows[0][0]) if rows else None


class Access:
    """Decides each request's `RequestContext`, or refuses it."""

    def __init__(
        self,
        *,
        service_header: tuple[str, str] | None,
        token_secret: str | None,
        token_audience: str,
        revocations: TokenRevocations,
    ) -> None:
        self._service_header = (
            (service_header[0].lower(), service_header[1].encode())
            if service_header is not None
            else None
        )
        self._token_secret = token_secret
        self._token_audience = token_audience
        self._revocations = revocations

    def may_revoke(self, headers: Mapping[str, str]) -> bool:
        """True for the service's logout: its credential, or any local caller when none is
        configured (the same trust such a server gives `X-HealthAgent-User`)."""
        return self._service_header is None or self.is_service(headers)

    def is_service(self, headers: Mapping[str, str]) -> bool:
        """True when the request carries the service's credential."""
        if self._service_header is None:
            return False
        name, expected = self._service_header
        return hmac.compare_digest(headers.get(name, "").encode(), expected)

    async def context_for(self, headers: Mapping[str, str]) -> RequestContext:
        """The end user of a request (header names in lower case)."""
        if self.is_service(headers):
            return RequestContext(_forwarded_user(headers), "service")
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer " and self._token_secret is not None:
            token = authorization[7:].strip()
            try:
                claims = verify_agent_token(self._token_secret, self._token_audience, token)
            except InvalidAgentToken:
                raise AccessDenied(401, "invalid or expired token") from None
            revoked = await self._revocations.revoked_before(claims.user)
            if revoked is not None and claims.issued_at <= revoked:
                raise AccessDenied(401, "invalid or expired token")
            return RequestContext(claims.user, "token", claims.state_variables)
        if self._service_header is None:
            return RequestContext(_forwarded_user(headers), "loopback")
        raise AccessDenied(401, "authentication required")


def _forwarded_user(headers: Mapping[str, str]) -> str:
    try:  # percent-encoded UTF-8 (`upstream.chatkit.forwarded_user`)
        user = unquote(headers.get(FORWARDED_USER_HEADER.lower(), ""), errors="strict")
    except UnicodeDecodeError:
        user = ""
    if not user or len(user) > MAX_USER_LENGTH or not user.isprintable():
        raise AccessDenied(400, f"the {FORWARDED_USER_HEADER} header must name the end user")
    return user
