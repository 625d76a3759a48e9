"""The `client_effect` events HealthAgent's agent server adds to the ChatKit stream.

ChatKit has no event for token usage, and its `error` event says only "retry or not". The agent
server sends what the gRPC caller needs as two effects, a convention of this project (ChatKit
passes effects through untouched, and a web ChatKit UI ignores names it does not handle):

- `healthagent.usage` `{input_tokens, output_tokens, total_tokens}`, before the stream ends;
- `healthagent.error` `{kind, reason, message, retry_after_seconds?, withdrawn_item_ids?}`,
  right before ChatKit's own `error` event: the status class (one of `TURN_ERROR_KINDS`) and a
  stable reason for the gRPC status, and the assistant messages whose text the caller already
  received and must now withdraw (an output guardrail tripped).
"""

from __future__ import annotations

USAGE_EFFECT = "healthagent.usage"
ERROR_EFFECT = "healthagent.error"
# What the agent server may ask the status to be; anything else is taken as UNAVAILABLE.
TURN_ERROR_KINDS = frozenset(
    {
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "INTERNAL",
    }
)
