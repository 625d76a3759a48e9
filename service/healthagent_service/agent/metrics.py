"""The agent server's Prometheus metrics (`HEALTHAGENT_AGENT_METRICS_LISTEN`), on the service's
`MetricsRegistry`. No label carries a user, a thread or a secret: the labels are ChatKit's
operation names, fixed outcomes, the failure reasons of `failures.py` and guardrail names (the
agent's code names them, not its callers).

Nothing is counted per streamed delta: a request is counted once when it ends, a turn when it
starts and when it ends, with the label children of every turn resolved here once.
"""

from __future__ import annotations

import time
from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram

from healthagent_service.agent.failures import INPUT_REFUSED, TurnFailure
from healthagent_service.metrics import MetricsRegistry

# a turn is one or more model calls (and the tools between them): seconds to minutes
_TURN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

# the operation of a request refused before its body was read or parsed
UNKNOWN_OPERATION = "unknown"


class RequestOutcome(StrEnum):
    """How a `POST /chatkit` ended."""

    OK = "ok"  # answered; for a streaming operation, its whole stream was sent
    CANCELLED = "cancelled"  # the caller left before the stream ended
    ERROR = "error"  # the server failed (HTTP 500, or a stream that broke off)
    INVALID = "invalid"  # 400: not a ChatKit request, or the credential without a user
    UNAUTHORIZED = "unauthorized"  # 401
    NOT_FOUND = "not_found"  # 404: another user's thread, or none
    CONFLICT = "conflict"  # 409: a tool output without a pending call
    TOO_LARGE = "too_large"  # 413


class TurnOutcome(StrEnum):
    """How an agent turn (one `respond()`) ended."""

    COMPLETED = "completed"
    FAILED = "failed"  # with a reason (`failures.py`), in healthagent_agent_turn_failures_total
    CANCELLED = "cancelled"  # the caller left, or missed its deadline


class AgentMetrics(MetricsRegistry):
    """The agent server's metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter(
            "healthagent_agent_requests",
            "POST /chatkit requests, by ChatKit operation, whether the operation streams, and "
            "outcome.",
            ["operation", "streaming", "outcome"],
            registry=self.registry,
        )
        self.turns_in_flight = Gauge(
            "healthagent_agent_turns_in_flight", "Agent turns running now.", registry=self.registry
        )
        self.turns = Counter(
            "healthagent_agent_turns",
            "Agent turns ended, by outcome (completed, failed, cancelled).",
            ["outcome"],
            registry=self.registry,
        )
        self.turn_duration = Histogram(
            "healthagent_agent_turn_duration_seconds",
            "From the start of a turn to its end (its last event, its failure or the caller "
            "leaving), by outcome.",
            ["outcome"],
            buckets=_TURN_BUCKETS,
            registry=self.registry,
        )
        self.turn_failures = Counter(
            "healthagent_agent_turn_failures",
            "Failed turns, by reason (the model's failures, guardrails, the store, the agent).",
            ["reason"],
            registry=self.registry,
        )
        self.guardrail_trips = Counter(
            "healthagent_agent_guardrail_trips",
            "Guardrail tripwires, by guardrail and stage (input, output).",
            ["guardrail", "stage"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "healthagent_agent_tokens",
            "Tokens the model reported, whatever the turn's outcome, by direction.",
            ["direction"],
            registry=self.registry,
        )
        # the children every turn updates, resolved once: `labels()` locks and looks up
        self._turn_children = {
            outcome: (self.turns.labels(outcome), self.turn_duration.labels(outcome))
            for outcome in TurnOutcome
        }
        self._input_tokens = self.tokens.labels("input")
        self._output_tokens = self.tokens.labels("output")
        # operations come from ChatKit's closed set of request types, outcomes from ours
        self._request_children: dict[tuple[str, bool, RequestOutcome], Counter] = {}

    def request(self, operation: str, streaming: bool, outcome: RequestOutcome) -> None:
        """Count one ended request."""
        key = (operation, streaming, outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(operation, "true" if streaming else "false", outcome)
            self._request_children[key] = child
        child.inc()

    def turn_started(self) -> float:
        """A turn began: its start, for `turn_ended`."""
        self.turns_in_flight.inc()
        return time.perf_counter()

    def turn_ended(
        self,
        started: float,
        outcome: TurnOutcome,
        *,
        failure: TurnFailure | None,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """A turn ended: its outcome, duration, failure (if it failed) and the model's usage."""
        self.turns_in_flight.dec()
        count, duration = self._turn_children[outcome]
        count.inc()
        duration.observe(time.perf_counter() - started)
        if input_tokens:
            self._input_tokens.inc(input_tokens)
        if output_tokens:
            self._output_tokens.inc(output_tokens)
        if failure is not None:
            self.turn_failures.labels(failure.reason).inc()
            guardrail = failure.metadata.get("guardrail")
            if guardrail is not None:
                stage = "input" if failure.reason == INPUT_REFUSED else "output"
                self.guardrail_trips.labels(guardrail, stage).inc()
