"""What the emulator answers: deterministic replies, steered by trigger phrases.

Trigger phrases (anywhere in the user's message, case-insensitive). "Model APIs" are
`/v1/responses` and `/v1/chat/completions` (`model_api.py`), where the phrase is read from the
last user message of the request's input:

| phrase        | effect                                                                        |
|---------------|-------------------------------------------------------------------------------|
| `[tool]`      | ChatKit: the reply ends with a pending client tool call `get_health_data`;    |
|               | model APIs: after the text the model calls `get_health_data` (TOOL_ARGUMENTS) |
|               | if the request offers that function tool (plain text otherwise)               |
| `[call NAME {json}]` | model APIs: after the text "Let me look that up." the model calls the  |
|               | function tool NAME with those arguments (a JSON object, default `{}`) if the  |
|               | request offers it; several in one message are parallel calls                  |
| `[notice]`    | a warning notice comes before the reply                                       |
| `[error]`     | ChatKit: after two chunks an `error` event (stream.error, retryable);         |
|               | Realtime: a non-fatal `error` event before the response;                      |
|               | Responses: after two deltas `response.failed` (error code server_error);      |
|               | Chat Completions: after two deltas a `{"error": {...}}` chunk                 |
| `[fatal]`     | ChatKit: after two chunks a non-retryable `error` event (code `custom`)       |
| `[malformed]` | ChatKit: after two chunks an event that is not JSON                           |
| `[drop]`      | after two chunks the connection is cut without finishing the response         |
| `[stall]`     | after two chunks the stream stalls for                                        |
|               | HEALTHAGENT_EMULATOR_SLOW_FIRST_BYTE_SECONDS                                  |
| `[nodata]`    | ChatKit: the closing events are sent without their `data:` prefix             |
| `[huge]`      | ChatKit: after two chunks, one 9 MiB line                                      |
| `[noend]`     | ChatKit and model APIs: after two chunks the body ends cleanly, without the   |
|               | closing events (Responses: no terminal event; chat: no finish chunk, no DONE) |
| `[length]`    | model APIs: after two chunks the answer stops at the output token limit       |
|               | (Responses: `response.incomplete`, reason `max_output_tokens`; chat:          |
|               | `finish_reason: length`, then `[DONE]`)                                       |
| `[slow]`      | the first byte is delayed (HEALTHAGENT_EMULATOR_SLOW_FIRST_BYTE_SECONDS)      |
| `[http NNN]`  | the conversation or model request is answered with HTTP NNN and the error     |
|               | envelope (429 carries `Retry-After: 2`)                                       |
| `[ratelimit]` | ChatKit and model APIs: HTTP 429; Realtime: `response.done` failed with       |
|               | rate_limit_exceeded                                                           |
| `[chunks=N]`  | the reply is exactly N chunks of about 20 bytes (1..100000)                   |
| `[pace=N]`    | N milliseconds between chunks for this reply (0..60000), instead of the       |
|               | emulator's HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS                                |
| `[stamp]`     | ChatKit and model APIs: each chunk's text is the emulator's CLOCK_MONOTONIC   |
|               | in nanoseconds when it sent that chunk (19 digits and a space), for latency   |
|               | benchmarks                                                                    |
| `[sameids]`   | Responses: the output items are numbered by their place, not random: the     |
|               | message is `msg_0`, function calls `fc_1`, `fc_2`, ... in every answer (also  |
|               | the one after tool results), so ids repeat across turns and within a turn, as |
|               | some Responses-compatible servers do; call ids stay random; chat: no effect   |

On the model APIs a request whose input ends with tool results (`function_call_output` items,
`role: tool` messages) is answered "Thanks. The tool returned <the result as JSON>." with no
trigger applied. Without a stream, `[error]` is a Response with status `failed` (Responses) or
HTTP 500 (chat), `[drop]` closes the connection without an answer, `[slow]`/`[stall]` delay the
answer, and `[noend]`, `[pace=N]` and `[stamp]` do nothing.

The same `Reply` drives the emulator and, in the tests, a real `openai-chatkit` server, so the
two can be compared byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_NAME = "get_health_data"
TOOL_ARGUMENTS: dict[str, Any] = {"metric": "steps", "days": 7}
PROGRESS_TEXT = "Thinking"
NOTICE = ("warning", "Emulator notice", "This notice was requested with [notice].")
CHUNKS_BEFORE_FAILURE = 2
FATAL_MESSAGE = "Emulated fatal error."
RATE_LIMIT_RETRY_AFTER_SECONDS = 2
MAX_CHUNKS = 100_000
_HTTP_TRIGGER = re.compile(r"\[http (\d{3})\]", re.IGNORECASE)
_CHUNKS_TRIGGER = re.compile(r"\[chunks=(\d{1,6})\]", re.IGNORECASE)
_PACE_TRIGGER = re.compile(r"\[pace=(\d{1,5})\]", re.IGNORECASE)
# `[call NAME` opens the trigger; the optional JSON arguments and the `]` are parsed after it,
# so arguments may hold brackets and nested objects.
_CALL_TRIGGER = re.compile(r"\[call\s+([A-Za-z0-9_-]{1,64})\s*", re.IGNORECASE)
_JSON = json.JSONDecoder()
CALL_PREAMBLE = "Let me look that up."
SAME_IDS_TRIGGER = "[sameids]"
MAX_PACE_MS = 60_000
_FILLER = "lorem ipsum dolor "  # 18 bytes; with the index, chunks are about 20 bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted assistant turn."""

    chunks: tuple[str, ...]
    notice: tuple[str, str, str] | None = None
    tool_call: bool = False
    fail_after: int | None = None  # emit an error event after this many chunks
    fatal_after: int | None = None  # emit a non-retryable error event after this many chunks
    malformed_after: int | None = None  # emit a non-JSON event after this many chunks
    stall_after: int | None = None  # stall (slow_first_byte_seconds) after this many chunks
    huge_after: int | None = None  # emit one oversized line after this many chunks
    end_after: int | None = None  # end the body cleanly after this many chunks
    length_after: int | None = None  # model APIs: stop at the token limit after this many
    no_data_prefix: bool = False  # send the closing events without `data:`
    drop_after: int | None = None  # cut the connection after this many chunks
    slow_first_byte: bool = False
    http_status: int | None = None
    rate_limited: bool = False
    pace_ms: int | None = None  # milliseconds between chunks, overriding the emulator's setting
    stamp: bool = False  # each chunk's text is replaced by its send time (see `stamp_text`)
    # Model APIs only: (tool name, JSON arguments) the model calls after the text, when the
    # request offers a function tool of that name.
    function_calls: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        """The whole assistant text."""
        return "".join(self.chunks)


def split_words(text: str) -> tuple[str, ...]:
    """Chunks of one word each, keeping the spaces, so joining them restores `text`."""
    return tuple(re.findall(r"\S+\s*|\s+", text)) or ("",)


def plan_reply(
    message: str | None, tool_result: Any = None, *, has_tool_result: bool = False
) -> Reply:
    """The reply to a user message, or to a tool result when `has_tool_result`."""
    if has_tool_result:
        text = f"Thanks. The tool returned {json.dumps(tool_result, sort_keys=True)}."
        return Reply(split_words(text))
    message = message or ""
    lowered = message.lower()
    http = _HTTP_TRIGGER.search(message)
    pace = _PACE_TRIGGER.search(message)
    count = _CHUNKS_TRIGGER.search(message)
    if count is not None:
        n = max(1, min(MAX_CHUNKS, int(count.group(1))))
        chunks: tuple[str, ...] = tuple(f"{i:02d} {_FILLER}"[:20] for i in range(n))
    else:
        chunks = split_words(
            f"You said: {message.strip()}. This reply comes from the HealthAgent emulator."
        )
    calls = requested_calls(message)
    tool = "[tool]" in lowered
    if tool:
        chunks = split_words("Let me look at your recent activity.")
        calls = ((TOOL_NAME, compact_json(TOOL_ARGUMENTS)), *calls)
    elif calls and count is None:
        chunks = split_words(CALL_PREAMBLE)
    return Reply(
        chunks=chunks,
        notice=NOTICE if "[notice]" in lowered else None,
        tool_call=tool,
        fail_after=CHUNKS_BEFORE_FAILURE if "[error]" in lowered else None,
        drop_after=CHUNKS_BEFORE_FAILURE if "[drop]" in lowered else None,
        fatal_after=CHUNKS_BEFORE_FAILURE if "[fatal]" in lowered else None,
        malformed_after=CHUNKS_BEFORE_FAILURE if "[malformed]" in lowered else None,
        stall_after=CHUNKS_BEFORE_FAILURE if "[stall]" in lowered else None,
        huge_after=CHUNKS_BEFORE_FAILURE if "[huge]" in lowered else None,
        end_after=CHUNKS_BEFORE_FAILURE if "[noend]" in lowered else None,
        length_after=CHUNKS_BEFORE_FAILURE if "[length]" in lowered else None,
        no_data_prefix="[nodata]" in lowered,
        slow_first_byte="[slow]" in lowered,
        http_status=int(http.group(1)) if http else (429 if "[ratelimit]" in lowered else None),
        rate_limited="[ratelimit]" in lowered,
        pace_ms=min(MAX_PACE_MS, int(pace.group(1))) if pace else None,
        stamp="[stamp]" in lowered,
        function_calls=calls,
    )


def requested_calls(message: str) -> tuple[tuple[str, str], ...]:
    """The `[call NAME {json}]` triggers in `message`: (name, compact JSON arguments) each.

    The arguments must be one JSON object (default `{}`); a trigger whose arguments do not
    parse, or are not an object, is not a trigger.
    """
    calls: list[tuple[str, str]] = []
    for match in _CALL_TRIGGER.finditer(message):
        arguments: Any = {}
        end = match.end()
        if message.startswith("{", end):
            try:
                arguments, end = _JSON.raw_decode(message, end)
            except ValueError:
                continue
            while end < len(message) and message[end].isspace():
                end += 1
        if isinstance(arguments, dict) and message.startswith("]", end):
            calls.append((match.group(1), compact_json(arguments)))
    return tuple(calls)


def compact_json(value: Any) -> str:
    """JSON as models write tool arguments: no spaces."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def stamp_text(monotonic_ns: int) -> str:
    """A `[stamp]` chunk: the send time, 20 bytes like the other scripted chunks."""
    return f"{monotonic_ns:019d} "


def parse_stamp(text: str) -> int:
    """The send time in a `[stamp]` chunk's text (CLOCK_MONOTONIC, nanoseconds)."""
    return int(text[:19])
