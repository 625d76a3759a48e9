"""Keeps secrets out of log lines: a structlog processor that redacts them wherever they are.

Two nets: the exact values of the configured secrets (the OpenAI key, JWT secret, database URL,
auth header...), and anything shaped like a credential (`sk-...`, `ek_...`, a JWT, a
`Bearer ...` value, a password in a URL).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any

REDACTED = "[redacted]"
_SECRET_KEYS = frozenset(
    {"client_secret", "api_key", "authorization", "openai_api_key", "token", "password", "secret"}
)
_CREDENTIAL_SHAPES = re.compile(
    r"(?:\bsk-[A-Za-z0-9_-]{8,}"  # OpenAI keys (and the emulator's)
    r"|\bek_[A-Za-z0-9_-]{8,}"  # ephemeral client secrets
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"  # Authorization values
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@))"  # user:password@ in URLs
)


class SecretRedactor:
    """A structlog processor; `add` registers secret values learned at start-up."""

    def __init__(self) -> None:
        self._values: list[str] = []

    def add(self, values: Iterable[str | None]) -> None:
        for value in values:
            if value and len(value) >= 6 and value not in self._values:
                self._values.append(value)
        self._values.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return _CREDENTIAL_SHAPES.sub(REDACTED, text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._clean(v) for v in value)
        if isinstance(value, dict):
            return {k: REDACTED if k in _SECRET_KEYS else self._clean(v) for k, v in value.items()}
        return value

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            event_dict[key] = REDACTED if key in _SECRET_KEYS else self._clean(value)
        return event_dict


REDACTOR = SecretRedactor()
