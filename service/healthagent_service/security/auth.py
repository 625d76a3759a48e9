"""Who is calling: a JWT (the end user is its `sub`) or a service API key (a principal that may
act for any user), from `authorization: Bearer <token>` metadata.

JWTs are verified with PyJWT: HS256 with a shared secret (Supabase's JWT secret), or RS256 /
ES256 with keys from a JWKS URL, cached and refetched when a token names an unknown key (key
rotation). `exp`, `nbf`, `iss` and `aud` are checked. API keys are stored as SHA-256 hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import structlog
from jwt.types import Options

from healthagent_service.errors import ErrorKind, HealthAgentError

log = structlog.get_logger(__name__)

ASYMMETRIC_ALGORITHMS = ("RS256", "ES256")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `user` is set for end users: they may only act as themselves."""

    name: str
    kind: str  # "user" (a JWT), "service" (an API key), or "anonymous" (auth is off)
    user: str | None = None

    def check_user(self, user: str) -> None:
        """PERMISSION_DENIED when an end user names someone else in a request."""
        if self.user is not None and user and user != self.user:
            raise HealthAgentError(
                ErrorKind.PERMISSION_DENIED,
                "USER_MISMATCH",
                "the request's user is not the authenticated user; a token may only act for "
                "its own subject",
            )


ANONYMOUS = Principal("anonymous", "anonymous")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A service API key as configured: who it is, and the SHA-256 of the key."""

    principal: str
    sha256: str


def hash_api_key(key: str) -> str:
    """The hex SHA-256 to put in HEALTHAGENT_API_KEYS for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def unauthenticated(message: str) -> HealthAgentError:
    return HealthAgentError(ErrorKind.UNAUTHENTICATED, "UNAUTHENTICATED", message)


class JwksCache:
    """Signing keys from a JWKS URL: cached, refetched after `ttl` or for an unknown key id."""

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        ttl_seconds: float,
        min_refresh_seconds: float = 10.0,
    ) -> None:
        self._url = url
        # Unknown key ids trigger a refetch at most this often, so made-up ids cannot make the
        # service hammer the JWKS endpoint.
        self._min_refresh = min_refresh_seconds
        self._http = http
        self._ttl = ttl_seconds
        self._keys: dict[str, tuple[Any, str | None]] = {}  # kid -> (key, its algorithm)
        self._fetched_at = float("-inf")
        self._failed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None, algorithm: str) -> Any:
        """The verification key for `kid`, which must be a key for `algorithm`."""
        stale = time.monotonic() - self._fetched_at > self._ttl
        if stale or (kid or "") not in self._keys:
            await self._refresh(force=stale)
        entry = self._keys.get(kid or "") or (
            next(iter(self._keys.values())) if kid is None and len(self._keys) == 1 else None
        )
        if entry is None:
            raise unauthenticated("the token is signed with an unknown key")
        key, key_algorithm = entry
        if key_algorithm is not None and key_algorithm != algorithm:
            raise unauthenticated("the token's algorithm does not match its key")
        return key

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            # One fetch for many concurrent callers, no hammering for made-up key ids, and no
            # fetch per request while the JWKS endpoint is down (the old keys keep working).
            now = time.monotonic()
            if now - self._failed_at < self._min_refresh:
                if self._keys:
                    return
                raise self._unavailable()
            if not force and now - self._fetched_at < self._min_refresh:
                return
            try:
                response = await self._http.get(self._url)
                response.raise_for_status()
                key_set = jwt.PyJWKSet.from_dict(response.json())
            except (httpx.HTTPError, ValueError, RecursionError, jwt.PyJWKSetError) as exc:
                log.warning("could not fetch the JWKS", error=type(exc).__name__)
                if not self._keys:
                    raise HealthAgentError(
                        ErrorKind.UNAVAILABLE,
                        "AUTH_KEYS_UNAVAILABLE",
                        "the token signing keys cannot be fetched right now",
                        retry_after_seconds=5.0,
                    ) from None
                return
            self._keys = {k.key_id or "": (k.key, k.algorithm_name) for k in key_set.keys}
            self._fetched_at = time.monotonic()

    def _unavailable(self) -> HealthAgentError:
        return HealthAgentError(
            ErrorKind.UNAVAILABLE,
            "AUTH_KEYS_UNAVAILABLE",
            "the token signing keys cannot be fetched right now",
            retry_after_seconds=5.0,
        )


class Authenticator:
    """Turns invocation metadata into a `Principal`, or refuses with UNAUTHENTICATED."""

    def __init__(
        self,
        *,
        jwt_secret: str | None,
        jwks: JwksCache | None,
        issuer: str | None,
        audience: str | None,
        api_keys: Sequence[ApiKey],
    ) -> None:
        self._jwt_secret = jwt_secret
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._api_keys = tuple(api_keys)

    @property
    def enabled(self) -> bool:
        """False when nothing is configured: every caller is anonymous (loopback only)."""
        return bool(self._jwt_secret or self._jwks or self._api_keys)

    async def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        """The caller, from its `authorization` metadata."""
        if not self.enabled:
            return ANONYMOUS
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = str(values[0]).partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated("the authorization metadata must be 'Bearer <token>'")
        service = self._api_key_principal(token)
        if service is not None:
            return service
        return await self._jwt_principal(token)

    def _api_key_principal(self, token: str) -> Principal | None:
        digest = hash_api_key(token)
        for key in self._api_keys:
            if hmac.compare_digest(digest, key.sha256.lower()):
                return Principal(key.principal, "service")
        return None

    async def _jwt_principal(self, token: str) -> Principal:
        if not (self._jwt_secret or self._jwks):
            raise unauthenticated("unknown API key")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("the token is neither a known API key nor a JWT") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise unauthenticated("the token's key id is malformed")
        if algorithm == "HS256" and self._jwt_secret:
            key: Any = self._jwt_secret
        elif algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            key = await self._jwks.key_for(kid, algorithm)
        else:
            raise unauthenticated(f"tokens signed with {algorithm!r} are not accepted")
        options: Options = {
            "require": ["exp", "sub"],
            "verify_aud": self._audience is not None,
            "verify_iss": self._issuer is not None,
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options=options,
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise unauthenticated("the token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise unauthenticated("the token's signature is wrong") from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthenticated(f"the token lacks the {exc.claim!r} claim") from None
        except (jwt.PyJWTError, TypeError, ValueError):
            # Also a key that does not fit the algorithm the token names.
            raise unauthenticated("the token is malformed") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise unauthenticated("the token's subject is empty")
        return Principal(subject, "user", user=subject)
