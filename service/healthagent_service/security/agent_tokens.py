"""The agent server's user tokens: what `MintSession` hands out in agent mode.

Hosted ChatKit minted a session whose `client_secret` let an app talk to ChatKit for one user
without the OpenAI key. A self-hosted agent server has no such sessions, so the service signs a
short-lived JWT instead (HS256 with HEALTHAGENT_AGENT_TOKEN_SECRET, shared by the two): `sub` the
end user, `aud` the agent server, at most `MAX_AGENT_TOKEN_TTL_SECONDS`. The agent server checks
it on its own, and refuses a token issued before the user's last logout (`RevokeSessions`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from healthagent_service.config import MAX_AGENT_TOKEN_TTL_SECONDS

ISSUER = "healthagent"
CLOCK_SKEW_LEEWAY_SECONDS = 30
_ALGORITHM = "HS256"
# a token's state variables travel in the token; bounded like MintSession's own limit
STATE_VARIABLES_CLAIM = "state_variables"


class InvalidAgentToken(Exception):  # noqa: N818 - a verdict on a token, not a failure of ours
    """The token is not one this service issued for this audience, or it has expired."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly signed token and what a MintSession answer says of it."""

    token: str
    token_id: str
    issued_at: float
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says."""

    user: str
    issued_at: float
    state_variables: dict[str, Any]


def issue_agent_token(
    secret: str,
    audience: str,
    user: str,
    ttl_seconds: int,
    state_variables: dict[str, Any] | None = None,
) -> IssuedToken:
    """Sign a token for `user`, valid for `ttl_seconds` (1..MAX_AGENT_TOKEN_TTL_SECONDS)."""
    ttl = max(1, min(MAX_AGENT_TOKEN_TTL_SECONDS, ttl_seconds))
    # sub-second `iat`, so a token minted just after a logout is not taken for an older one
    issued_at = time.time()
    expires = int(issued_at) + ttl
    token_id = f"agt_{secrets.token_hex(16)}"
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": user,
        "aud": audience,
        "iat": issued_at,
        "exp": expires,
        "jti": token_id,
    }
    if state_variables:
        claims[STATE_VARIABLES_CLAIM] = state_variables
    token = jwt.encode(claims, secret, algorithm=_ALGORITHM)
    return IssuedToken(token, token_id, issued_at, datetime.fromtimestamp(expires, UTC))


def verify_agent_token(secret: str, audience: str, token: str) -> TokenClaims:
    """The claims of a valid token; raises `InvalidAgentToken` (never saying why in a way
    that would help a forger: the reason is for the server's log)."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[_ALGORITHM],
            audience=audience,
            issuer=ISSUER,
            options={"require": ["sub", "aud", "iss", "iat", "exp"]},
            # the service and the agent server may be different hosts: some clock skew
            leeway=CLOCK_SKEW_LEEWAY_SECONDS,
        )
    except jwt.PyJWTError as exc:
        raise InvalidAgentToken(type(exc).__name__) from None
    user = claims["sub"]
    state = claims.get(STATE_VARIABLES_CLAIM) or {}
    if not isinstance(user, str) or not user or not isinstance(state, dict):
        raise InvalidAgentToken("malformed claims")
    return TokenClaims(user, float(claims["iat"]), state)
