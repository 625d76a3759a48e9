"""`HealthAgentError` -> gRPC status with `google.rpc` details (AIP-193)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.security.redaction import REDACTOR

ERROR_DOMAIN = "healthagent.v1"
# where gRPC carries a google.rpc.Status; what grpc_status.rpc_status reads on the client side
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_CODES: dict[ErrorKind, tuple[grpc.StatusCode, int]] = {
    ErrorKind.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    ErrorKind.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    ErrorKind.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    ErrorKind.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    ErrorKind.FAILED_PRECONDITION: (
        grpc.StatusCode.FAILED_PRECONDITION,
        code_pb2.FAILED_PRECONDITION,
    ),
    ErrorKind.RESOURCE_EXHAUSTED: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    ErrorKind.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    ErrorKind.ABORTED: (grpc.StatusCode.ABORTED, code_pb2.ABORTED),
    ErrorKind.DEADLINE_EXCEEDED: (grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
    ErrorKind.UNIMPLEMENTED: (grpc.StatusCode.UNIMPLEMENTED, code_pb2.UNIMPLEMENTED),
    ErrorKind.INTERNAL: (grpc.StatusCode.INTERNAL, code_pb2.INTERNAL),
}
# Kinds whose callers should be told when to come back.
_RETRYABLE = frozenset({ErrorKind.RESOURCE_EXHAUSTED, ErrorKind.UNAVAILABLE})
DEFAULT_RETRY_DELAY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RichStatus(grpc.Status):
    """What `grpc_status.rpc_status.to_status` builds, with room for more trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def status_code(error: HealthAgentError) -> grpc.StatusCode:
    """The gRPC status code for an error kind."""
    return _CODES[error.kind][0]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(
    error: HealthAgentError, *, trailing_metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.Status:
    """A status carrying ErrorInfo always, BadRequest and RetryInfo where they apply, and
    `trailing_metadata` besides its details."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if error.field_violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.field_violations
                    ]
                )
            )
        )
    if error.kind in _RETRYABLE:
        delay = error.retry_after_seconds
        if delay is None or not math.isfinite(delay) or delay < 0:
            delay = DEFAULT_RETRY_DELAY_SECONDS
        seconds = int(delay)
        details.append(
            _pack(
                error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(
                        seconds=seconds, nanos=int((delay - seconds) * 1e9)
                    )
                )
            )
        )
    # Upstream error texts end up in messages; they pass the same redactor as log lines.
    proto = status_pb2.Status(
        code=_CODES[error.kind][1], message=REDACTOR.redact(error.message), details=details
    )
    return RichStatus(
        code=_CODES[error.kind][0],
        details=proto.message,
        trailing_metadata=(
            (STATUS_DETAILS_KEY, proto.SerializeToString()),
            *trailing_metadata,
        ),
    )
