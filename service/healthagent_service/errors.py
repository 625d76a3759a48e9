"""Domain errors: what went wrong, independent of gRPC.

Upstream adapters and request validation raise `HealthAgentError`; only the API layer turns it
into a gRPC status (see `api/status.py`). `reason` values are stable and documented in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ErrorKind(Enum):
    """The class of failure; maps one-to-one onto a gRPC status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field."""

    field: str
    description: str


@dataclass(eq=False)
class HealthAgentError(Exception):
    """A failure with a status class, a stable reason and a message safe to show a caller.

    The message must never contain a secret: callers build it from settings names and upstream
    error messages, never from keys or client secrets.
    """

    kind: ErrorKind
    reason: str
    message: str
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after_seconds: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.reason}: {self.message}"


def invalid_argument(violations: list[FieldViolation]) -> HealthAgentError:
    """INVALID_ARGUMENT listing every bad field."""
    summary = "; ".join(
        f"{v.field}: {v.description}" if v.field else v.description for v in violations
    )
    return HealthAgentError(
        ErrorKind.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        f"invalid request: {summary}",
        field_violations=tuple(violations),
    )


def conversation_not_found(conversation_id: str, **metadata: str) -> HealthAgentError:
    """NOT_FOUND for a conversation that does not exist or belongs to someone else (the two
    are indistinguishable on purpose)."""
    return HealthAgentError(
        ErrorKind.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
        f"conversation {conversation_id!r} does not exist",
        field_violations=(FieldViolation("conversation_id", "unknown conversation"),),
        metadata=dict(metadata),
    )
