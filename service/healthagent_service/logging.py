"""structlog set-up: JSON lines when not on a terminal, request ids from contextvars, secrets
redacted (also in library log lines, which go through the same processors)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

import structlog

from healthagent_service.config import LogFormat
from healthagent_service.security.redaction import REDACTOR

# The request id and RPC of the call being handled, for every log line it causes. One variable
# set once per call: structlog's `bind_contextvars` sets one per key and builds a dict of
# tokens, several times the cost, on every call (docs/decisions/0009-per-call-python.md).
# A plain pair: a named tuple's constructor would be a Python call per RPC.
_CALL: ContextVar[tuple[str, str] | None] = ContextVar("healthagent_call", default=None)


def bind_call(request_id: str, rpc: str) -> None:
    """Tag the current task's log lines (and those of tasks it starts) with this call."""
    _CALL.set((request_id, rpc))


def add_call_context(logger: Any, method_name: str, event_dict: Any) -> Any:
    """structlog processor: the bound call's `request_id` and `rpc`."""
    call = _CALL.get()
    if call is not None:
        request_id, rpc = call
        event_dict.setdefault("request_id", request_id)
        event_dict.setdefault("rpc", rpc)
    return event_dict


def configure_logging(log_format: LogFormat = LogFormat.AUTO, level: str = "info") -> None:
    """Configure structlog (and stdlib logging, for libraries) once at start-up."""
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    as_json = log_format is LogFormat.JSON or (
        log_format is LogFormat.AUTO and not sys.stderr.isatty()
    )
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_call_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library loggers (httpx logs every request URL at INFO) stay at WARNING, rendered and
    # redacted like our own lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
