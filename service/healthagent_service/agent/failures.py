"""What went wrong in an agent run, as the gRPC caller should hear it.

Each failure becomes a `healthagent.error` effect (`upstream/chatkit_effects.py`) followed by
ChatKit's own `error` event, so a plain ChatKit client still sees an error. The policy:
- the model's 429: RESOURCE_EXHAUSTED with its Retry-After;
- the model's 5xx, a refused or cut connection, a stream without its terminal event, or
  `response.failed`: UNAVAILABLE (retryable: nothing was stored as an answer);
- the model refusing our key or our request (401/403/400/404): FAILED_PRECONDITION, naming
  the setting to fix;
- the model stopping its answer early (its output token limit, its content filter):
  FAILED_PRECONDITION, not retryable (the same request stops the same way), the text kept as
  an incomplete answer;
- a guardrail tripwire: INVALID_ARGUMENT (input) or FAILED_PRECONDITION (output), never a
  retry, with the assistant messages whose text is withdrawn;
- the Agents SDK refusing the agent as configured: FAILED_PRECONDITION;
- anything else is a defect of the agent's code: INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import httpx2
import openai
import pydantic
from agents.exceptions import (
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    ModelBehaviorError,
    OutputGuardrailTripwireTriggered,
    UserError,
)

from healthagent_service.agent.model import ModelAnswerIncompleteError, TruncatedModelStream

DEFAULT_RETRY_AFTER_SECONDS = 1.0
INPUT_REFUSED = "INPUT_REFUSED"


@dataclass(frozen=True, slots=True)
class TurnFailure:
    """The status class, stable reason and message of a failed run."""

    kind: str
    reason: str
    message: str
    retry_after_seconds: float | None = None
    withdrawn_item_ids: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        return self.kind in {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}

    def effect_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "reason": self.reason, "message": self.message}
        if self.retry_after_seconds is not None:
            data["retry_after_seconds"] = self.retry_after_seconds
        if self.withdrawn_item_ids:
            data["withdrawn_item_ids"] = list(self.withdrawn_item_ids)
        if self.metadata:
            data["metadata"] = self.metadata
        return data


def _retry_after(response: httpx2.Response | None) -> float:
    if response is not None:
        try:
            seconds = float(response.headers.get("retry-after", ""))
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return DEFAULT_RETRY_AFTER_SECONDS


def _guardrail_name(exc: InputGuardrailTripwireTriggered | OutputGuardrailTripwireTriggered) -> str:
    return str(exc.guardrail_result.guardrail.get_name())


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _stopped_early(exc: BaseException) -> str | None:
    """Why the model stopped its answer early, if that is what `exc` says."""
    for cause in _causes(exc):
        if isinstance(cause, ModelAnswerIncompleteError):
            return cause.finish_reason
        # the Agents SDK's own error for the Responses API's `response.incomplete` (its
        # message names the event and the Response's incomplete_details)
        if isinstance(cause, ModelBehaviorError) and "`response.incomplete`" in str(cause):
            found = re.search(r"reason='([a-z_]+)'", str(cause))
            return found.group(1) if found else "response.incomplete"
    return None


def classify_failure(exc: BaseException, added_messages: Sequence[str]) -> TurnFailure | None:
    """The failure `exc` stands for; None for an exception that is a defect (INTERNAL)."""
    if isinstance(exc, OutputGuardrailTripwireTriggered):
        name = _guardrail_name(exc)
        return TurnFailure(
            "FAILED_PRECONDITION",
            "OUTPUT_WITHDRAWN",
            f"the answer was withdrawn by the output guardrail {name!r}; discard its text",
            withdrawn_item_ids=tuple(added_messages),
            metadata={"guardrail": name},
        )
    if isinstance(exc, InputGuardrailTripwireTriggered):
        name = _guardrail_name(exc)
        return TurnFailure(
            "INVALID_ARGUMENT",
            INPUT_REFUSED,
            f"the message was refused by the input guardrail {name!r}",
            withdrawn_item_ids=tuple(added_messages),
            metadata={"guardrail": name},
        )
    if isinstance(exc, openai.RateLimitError):
        return TurnFailure(
            "RESOURCE_EXHAUSTED",
            "MODEL_RATE_LIMITED",
            "the model is rate limiting requests",
            retry_after_seconds=_retry_after(exc.response),
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        metadata = {"model_status": str(status)}
        if status >= 500:
            return TurnFailure(
                "UNAVAILABLE",
                "MODEL_ERROR",
                f"the model failed with HTTP {status}",
                retry_after_seconds=_retry_after(exc.response),
                metadata=metadata,
            )
        if status in {401, 403}:
            return TurnFailure(
                "FAILED_PRECONDITION",
                "MODEL_AUTH_REJECTED",
                "the model API rejected the agent server's key; check OPENAI_API_KEY",
                metadata=metadata,
            )
        return TurnFailure(
            "FAILED_PRECONDITION",
            "MODEL_REJECTED_REQUEST",
            f"the model API answered HTTP {status}; check HEALTHAGENT_AGENT_MODEL and "
            "HEALTHAGENT_AGENT_BASE_URL",
            metadata=metadata,
        )
    stopped = _stopped_early(exc)
    if stopped is not None:
        return TurnFailure(
            "FAILED_PRECONDITION",
            "MODEL_ANSWER_INCOMPLETE",
            f"the model stopped its answer early ({stopped}); the answer is incomplete",
            metadata={"model_stop": stopped},
        )
    if any(isinstance(cause, TruncatedModelStream) for cause in _causes(exc)):
        # the openai client wraps it in an APIConnectionError
        return TurnFailure(
            "UNAVAILABLE",
            "MODEL_STREAM_FAILED",
            "the model's stream ended before its answer was complete",
            retry_after_seconds=DEFAULT_RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, (openai.APIConnectionError, httpx.HTTPError, httpx2.HTTPError)):
        # APITimeoutError is an APIConnectionError
        return TurnFailure(
            "UNAVAILABLE",
            "MODEL_UNAVAILABLE",
            f"cannot reach the model, or the connection was cut ({type(exc).__name__})",
            retry_after_seconds=DEFAULT_RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, openai.APIError):
        # an error object inside an otherwise good stream
        return TurnFailure(
            "UNAVAILABLE",
            "MODEL_STREAM_FAILED",
            "the model's stream reported an error",
            retry_after_seconds=DEFAULT_RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, ModelBehaviorError):
        # response.failed, response.incomplete, or no terminal event
        return TurnFailure(
            "UNAVAILABLE",
            "MODEL_STREAM_FAILED",
            "the model did not finish its answer",
            retry_after_seconds=DEFAULT_RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, (ValueError, pydantic.ValidationError)) and not isinstance(
        exc, UnicodeError
    ):
        # the model server's stream did not parse (a malformed event from a compatible server)
        return TurnFailure(
            "UNAVAILABLE",
            "MODEL_STREAM_FAILED",
            "the model's stream could not be read",
            retry_after_seconds=DEFAULT_RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, (OSError, sqlite3.Error, asyncpg.PostgresError)):
        return TurnFailure(
            "UNAVAILABLE",
            "AGENT_STORE_UNAVAILABLE",
            "the agent server's thread store cannot be reached",
            retry_after_seconds=DEFAULT_RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, UserError):
        # the Agents SDK refusing the agent as configured (a hosted tool on Chat Completions)
        return TurnFailure(
            "FAILED_PRECONDITION",
            "AGENT_MISCONFIGURED",
            f"the agent cannot run as configured: {exc.message}",
        )
    if isinstance(exc, MaxTurnsExceeded):
        return TurnFailure(
            "FAILED_PRECONDITION",
            "AGENT_MAX_TURNS",
            "the agent used all its turns without an answer (HEALTHAGENT_AGENT_MAX_TURNS)",
        )
    return None
