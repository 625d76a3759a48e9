"""Ephemeral Realtime client secrets: minted with the API key (`POST /realtime/client_secrets`),
pooled so that sockets share them and a reconnect after 80% of a secret's life uses a fresh
one. The API key itself only mints."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx

from healthagent_service.domain.events import MintedSession, SessionOptions
from healthagent_service.domain.session_pool import SessionPool
from healthagent_service.errors import ErrorKind, FieldViolation, HealthAgentError
from healthagent_service.upstream import realtime_events as rt
from healthagent_service.upstream.realtime_config import RealtimeConfig
from healthagent_service.upstream.upstream_json import decode_json, upstream_id


class RealtimeSecrets:
    """Mints secrets, and keeps the pool that sockets take theirs from."""

    def __init__(self, config: RealtimeConfig, http: httpx.AsyncClient) -> None:
        self._config = config
        self._http = http
        self.pool = SessionPool(
            self._mint_for_pool, max_size=4, refresh_fraction=config.refresh_fraction
        )
        # every socket's secret is for the configured model and lifetime
        self._for_sockets = SessionOptions(
            user="", workflow_id=config.model, ttl_seconds=config.secret_ttl_seconds
        )

    async def for_socket(self) -> MintedSession:
        """A pooled secret to open a socket with."""
        return await self.pool.get(self._for_sockets)

    def rejected(self, secret: MintedSession) -> None:
        """The upstream refused `secret`: drop it from the pool."""
        self.pool.evict(self._for_sockets, secret.id)

    async def close(self) -> None:
        await self.pool.close()

    def _require_key(self) -> str:
        if not self._config.api_key:
            raise HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_API_KEY_MISSING",
                f"{self._config.api_key_setting} is not set; the service cannot reach the "
                "Realtime API",
            )
        return self._config.api_key

    async def mint(self, ttl_seconds: int | None = None) -> MintedSession:
        """Mint an ephemeral `ek_` secret (`POST /realtime/client_secrets`)."""
        key = self._require_key()
        body: dict[str, Any] = {
            "expires_after": {
                "anchor": "created_at",
                "seconds": ttl_seconds or self._config.secret_ttl_seconds,
            },
            "session": {
                "type": "realtime",
                "model": self._config.model,
                "instructions": self._config.instructions,
                "output_modalities": ["text"],
            },
        }
        if self._config.tools:
            body["session"]["tools"] = list(self._config.tools)
        try:
            response = await self._http.post(
                f"{self._config.base_url}/realtime/client_secrets",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
        except httpx.HTTPError as exc:
            raise HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_UNAVAILABLE",
                f"cannot reach the upstream ({type(exc).__name__})",
                retry_after_seconds=self._config.retry_after_seconds,
            ) from None
        if response.status_code != 200:
            raise self._mint_error(response)
        try:
            answer = decode_json(response.content)
            expires_at = int(answer["expires_at"])
            secret = upstream_id(answer["value"], "client secret")
            session_id = upstream_id((answer.get("session") or {}).get("id") or "", "session id")
        except (ValueError, TypeError, KeyError) as exc:
            raise rt.protocol_error(
                f"client secret answer lacks {exc}", self._config.retry_after_seconds
            ) from None
        remaining = expires_at - time.time()
        if remaining <= 0:
            raise rt.protocol_error(
                "the upstream minted a secret that has already expired",
                self._config.retry_after_seconds,
            )
        return MintedSession(
            id=session_id,
            client_secret=secret,
            expires_at=datetime.fromtimestamp(expires_at, UTC),
            workflow_id=self._config.model,
            user="",
            minted_at_monotonic=time.monotonic(),
            lifetime_seconds=remaining,
        )

    async def _mint_for_pool(self, options: SessionOptions) -> MintedSession:
        return await self.mint(options.ttl_seconds)

    def _mint_error(self, response: httpx.Response) -> HealthAgentError:
        try:
            error = decode_json(response.content)["error"]
            message, param = str(error.get("message")), error.get("param")
        except (ValueError, TypeError, KeyError, AttributeError):
            message, param = response.text[:200], None
        metadata = {"upstream_status": str(response.status_code)}
        if response.status_code in (401, 403):
            return HealthAgentError(
                ErrorKind.FAILED_PRECONDITION,
                "UPSTREAM_API_KEY_REJECTED",
                f"the upstream rejected {self._config.api_key_setting}; check that setting",
                metadata=metadata,
            )
        if response.status_code == 429:
            return HealthAgentError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "UPSTREAM_RATE_LIMITED",
                f"the upstream is rate limiting requests: {message}",
                retry_after_seconds=self._config.retry_after_seconds,
                metadata=metadata,
            )
        if response.status_code >= 500:
            return HealthAgentError(
                ErrorKind.UNAVAILABLE,
                "UPSTREAM_ERROR",
                f"the upstream failed with HTTP {response.status_code}: {message}",
                retry_after_seconds=self._config.retry_after_seconds,
                metadata=metadata,
            )
        if param == "expires_after.seconds":
            return HealthAgentError(
                ErrorKind.INVALID_ARGUMENT,
                "UPSTREAM_REJECTED_REQUEST",
                f"the upstream rejected the request: {message}",
                field_violations=(FieldViolation("ttl_seconds", message),),
                metadata=metadata,
            )
        return HealthAgentError(
            ErrorKind.FAILED_PRECONDITION,
            "UPSTREAM_REJECTED_REQUEST",
            f"the upstream answered HTTP {response.status_code}: {message}",
            metadata=metadata,
        )
