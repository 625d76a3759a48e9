"""Reading what a call returned: its events, its error's google.rpc details; and waiting for a
condition a call brings about."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from healthagent.v1 import health_agent_pb2 as pb


async def collect(call: Any) -> list[pb.ChatResponse]:
    """Every event of a Chat call (raises the call's error, if any)."""
    return [event async for event in call]


def event_kinds(events: list[pb.ChatResponse]) -> list[str]:
    """The oneof name of each event."""
    return [str(event.WhichOneof("event")) for event in events]


@dataclass
class StatusDetails:
    """A failed call's code, message and google.rpc details."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    field_violations: list[tuple[str, str]]
    retry_delay_seconds: float | None


def status_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> StatusDetails:
    """Parse the `grpc-status-details-bin` trailer into its parts."""
    trailers: Any = error.trailing_metadata() or ()
    raw = next(value for key, value in trailers if key == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    reason, metadata, violations, retry = "", {}, [], None
    for detail in status.details:
        detail: any_pb2.Any  # type: ignore[no-redef]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "healthagent.v1"
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            retry = info_retry.retry_delay.seconds + info_retry.retry_delay.nanos / 1e9
    assert reason, "every error carries an ErrorInfo with a reason"
    return StatusDetails(
        error.code(),
        status.message,
        reason,
        metadata,
        violations,
        retry,
    )


async def wait_for(predicate: object, timeout: float = 3.0) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not reached in {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started
