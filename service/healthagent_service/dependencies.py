"""Health follows what the service cannot serve without: Redis when the limits live there
(they fail closed), PostgreSQL when the history does. While one cannot be reached, the gRPC
health service says NOT_SERVING, so load balancers and orchestrators see it; calls that need it
meanwhile fail UNAVAILABLE with `RetryInfo`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog
from grpc_health.v1 import health, health_pb2

log = structlog.get_logger(__name__)

CHECK_INTERVAL_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 2.0
Check = tuple[str, Callable[[], Awaitable[None]]]


async def _failures(checks: Sequence[Check]) -> list[str]:
    """The names of the dependencies that did not answer in time, with why."""
    failed = []
    for name, check in checks:
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
        except Exception as exc:  # unreachable, refused, timed out: all the same here
            failed.append(f"{name} ({type(exc).__name__})")
    return failed


async def watch_dependencies(
    health_servicer: health.aio.HealthServicer,
    services: Sequence[str],
    checks: Sequence[Check],
    interval: float = CHECK_INTERVAL_SECONDS,
) -> None:
    """Check every `interval` s; set `services` NOT_SERVING while any check fails, SERVING
    again once all pass. (After a graceful shutdown began, health ignores the updates.)"""
    serving = True
    while True:
        await asyncio.sleep(interval)
        failed = await _failures(checks)
        if serving == (not failed):
            continue
        serving = not failed
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in services:
            await health_servicer.set(service, status)
        if serving:
            log.info("dependencies reachable again: serving")
        else:
            log.warning("a dependency is unreachable: not serving", dependencies=failed)
