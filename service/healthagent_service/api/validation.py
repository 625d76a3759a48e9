"""Request validation: protobuf requests in, the project's typed requests out.

Every problem is reported at once, as INVALID_ARGUMENT with one BadRequest field violation per
bad field (field paths as in the proto).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, NamedTuple

from google.protobuf import struct_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.domain.events import CONVERSATION_ID, ChatTurn, ToolOutput
from healthagent_service.errors import FieldViolation, invalid_argument

MAX_ID_CHARS = 256
MAX_MESSAGE_BYTES = 32 * 1024
MAX_STATE_VARIABLES = 64
MAX_STATE_VARIABLE_VALUE_BYTES = 4 * 1024
# keys and encoded values together: each distinct set is a pooled session of its own
MAX_STATE_VARIABLES_BYTES = 16 * 1024
# deeper JSON is refused: Python's parser and encoder recurse, and upstreams refuse it too
MAX_JSON_DEPTH = 64
# Lifetimes the upstreams accept: ChatKit sessions 1..600 s, Realtime secrets 10..7200 s.
TTL_RANGES = {pb.SESSION_KIND_CHATKIT: (1, 600), pb.SESSION_KIND_REALTIME: (10, 7200)}
_SESSION_KINDS = frozenset(
    {pb.SESSION_KIND_UNSPECIFIED, pb.SESSION_KIND_CHATKIT, pb.SESSION_KIND_REALTIME}
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Unicode categories an id must not contain: controls, format characters (bidi overrides,
# zero-width joiners and spaces), surrogates, private use, unassigned, line and paragraph
# separators. Ids name users and key their limits: invisible characters would make look-alikes.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _reject_non_json_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON does not, and upstreams would refuse them.
    raise ValueError(f"{name} is not JSON")


def is_printable(value: str) -> bool:
    """True when `value` has visible text, no control, format (bidi, zero-width) or separator
    characters, and no space other than U+0020, nor one at either end."""
    if value.isascii():  # the usual case, without a look at each character
        return not _CONTROL.search(value) and bool(value) and value == value.strip()
    if value != value.strip() or not value.strip():
        return False
    category = unicodedata.category
    return not any(
        category(c) in _HIDDEN_CATEGORIES or (c != " " and category(c) == "Zs") for c in value
    )


def _check_id(name: str, value: str, violations: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(name, "is required and must not be empty"))
        return
    if len(value) > MAX_ID_CHARS:
        violations.append(FieldViolation(name, f"must be at most {MAX_ID_CHARS} characters"))
    elif not is_printable(value):
        violations.append(
            FieldViolation(
                name,
                "must be printable text: no control, invisible or separator characters, and no "
                "space at either end",
            )
        )


def json_too_deep(value: Any) -> bool:
    """True when a parsed JSON value nests deeper than `MAX_JSON_DEPTH` (walked without
    recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_problem(text: str) -> str | None:
    """Why `text` is not JSON the service accepts, or None."""
    try:
        value = json.loads(text, parse_constant=_reject_non_json_constant)
    except RecursionError:
        return f"must not nest deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:
        return "must be valid JSON"
    if json_too_deep(value):
        return f"must not nest deeper than {MAX_JSON_DEPTH} levels"
    return None


def _state_variable(
    name: str, value: struct_pb2.Value, violations: list[FieldViolation]
) -> str | None:
    """The JSON text to send upstream for one state variable, or None if invalid."""
    kind = value.WhichOneof("kind")
    field = f"state_variables[{name!r}]"
    if kind == "string_value":
        text = value.string_value
        if "\x00" in text:
            violations.append(FieldViolation(field, "must not contain NUL characters"))
            return None
        if len(text.encode()) > MAX_STATE_VARIABLE_VALUE_BYTES:
            violations.append(
                FieldViolation(
                    field, f"must be at most {MAX_STATE_VARIABLE_VALUE_BYTES} bytes of UTF-8"
                )
            )
            return None
        return json.dumps(text)
    if kind == "bool_value":
        return json.dumps(value.bool_value)
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            violations.append(FieldViolation(field, "must be a finite number"))
            return None
        return json.dumps(int(number) if number.is_integer() else number)
    violations.append(FieldViolation(field, "must be a string, number or boolean"))
    return None


class MintRequest(NamedTuple):
    """A validated MintSession request; the upstream adds the workflow. (A named tuple, built
    in C: MintSession's hot path.)"""

    kind: int
    user: str
    device_id: str
    version: str | None
    state_variables: tuple[tuple[str, str], ...]
    ttl_seconds: int | None


def mint_request(request: pb.MintSessionRequest) -> MintRequest:
    """Validate a MintSession request for a ChatKit session."""
    # each field read once: every read of a protobuf field looks it up by name
    user, device_id, requested_kind = request.user, request.device_id, request.kind
    violations: list[FieldViolation] = []
    _check_id("user", user, violations, required=True)
    _check_id("device_id", device_id, violations, required=False)
    if requested_kind not in _SESSION_KINDS:
        violations.append(FieldViolation("kind", f"unknown session kind {requested_kind}"))
    version: str | None = None
    if request.HasField("version"):
        version = request.version
        if not version.strip() or version.strip().lower() == "latest":
            violations.append(
                FieldViolation(
                    "version", "must name a workflow version; leave it unset for the current one"
                )
            )
        elif len(version) > 64 or not is_printable(version):
            violations.append(FieldViolation("version", "must be at most 64 printable characters"))
    variables: list[tuple[str, str]] = []
    state_variables = request.state_variables
    if len(state_variables) > MAX_STATE_VARIABLES:
        violations.append(
            FieldViolation("state_variables", f"must have at most {MAX_STATE_VARIABLES} entries")
        )
    elif state_variables:  # usually empty: nothing to sort
        size = 0
        for name in sorted(state_variables):
            if not name or len(name) > 64 or not is_printable(name):
                violations.append(
                    FieldViolation(
                        "state_variables", f"key {name!r} must be 1..64 printable characters"
                    )
                )
                continue
            encoded = _state_variable(name, state_variables[name], violations)
            if encoded is not None:
                variables.append((name, encoded))
                size += len(name.encode()) + len(encoded.encode())
        if size > MAX_STATE_VARIABLES_BYTES:
            violations.append(
                FieldViolation(
                    "state_variables",
                    f"must be at most {MAX_STATE_VARIABLES_BYTES} bytes in all (keys and JSON "
                    "values)",
                )
            )
    kind = (
        pb.SESSION_KIND_CHATKIT if requested_kind == pb.SESSION_KIND_UNSPECIFIED else requested_kind
    )
    ttl: int | None = None
    if request.HasField("ttl_seconds"):
        ttl = request.ttl_seconds
        low, high = TTL_RANGES.get(kind, (1, 600))
        if not low <= ttl <= high:
            violations.append(FieldViolation("ttl_seconds", f"must be within {low}..{high}"))
    if kind == pb.SESSION_KIND_REALTIME and (version is not None or variables):
        violations.append(
            FieldViolation(
                "version" if version is not None else "state_variables",
                "applies to ChatKit workflows only, not to SESSION_KIND_REALTIME",
            )
        )
    if violations:
        raise invalid_argument(violations)
    return MintRequest(kind, user, device_id, version, tuple(variables), ttl)


def chat_request(request: pb.ChatRequest, max_message_bytes: int = MAX_MESSAGE_BYTES) -> ChatTurn:
    """Validate a Chat request."""
    violations: list[FieldViolation] = []
    _check_id("user", request.user, violations, required=True)
    _check_id("device_id", request.device_id, violations, required=False)
    conversation_id: str | None = None
    if request.HasField("conversation_id"):
        conversation_id = request.conversation_id
        if not CONVERSATION_ID.fullmatch(conversation_id):
            violations.append(
                FieldViolation(
                    "conversation_id", "must be 1..128 characters of letters, digits and _.:-"
                )
            )
    message: str | None = None
    tool_output: ToolOutput | None = None
    which = request.WhichOneof("input")
    if which is None:
        violations.append(FieldViolation("message", "either message or tool_output is required"))
    elif which == "message":
        message = request.message
        if not message.strip():
            violations.append(FieldViolation("message", "must not be empty"))
        elif len(message.encode()) > max_message_bytes:
            violations.append(
                FieldViolation("message", f"must be at most {max_message_bytes} bytes of UTF-8")
            )
        elif "\x00" in message:  # PostgreSQL text cannot hold it: refused on every backend
            violations.append(FieldViolation("message", "must not contain NUL characters"))
    else:
        output = request.tool_output
        _check_id("tool_output.call_id", output.call_id, violations, required=True)
        if len(output.output_json.encode()) > max_message_bytes:
            violations.append(
                FieldViolation(
                    "tool_output.output_json", f"must be at most {max_message_bytes} bytes"
                )
            )
        else:
            problem = json_problem(output.output_json)
            if problem is not None:
                violations.append(FieldViolation("tool_output.output_json", problem))
        if conversation_id is None:
            violations.append(
                FieldViolation("conversation_id", "is required to answer a tool call")
            )
        tool_output = ToolOutput(output.call_id, output.output_json)
    if violations:
        raise invalid_argument(violations)
    return ChatTurn(
        user=request.user,
        device_id=request.device_id,
        message=message,
        tool_output=tool_output,
        conversation_id=conversation_id,
    )


def user_only(user: str) -> str:
    """Validate a request that names only the end user."""
    violations: list[FieldViolation] = []
    _check_id("user", user, violations, required=True)
    if violations:
        raise invalid_argument(violations)
    return user


def user_and_conversation(user: str, conversation_id: str) -> tuple[str, str]:
    """Validate a request that names the end user and one of their conversations."""
    violations: list[FieldViolation] = []
    _check_id("user", user, violations, required=True)
    if not CONVERSATION_ID.fullmatch(conversation_id):
        violations.append(
            FieldViolation(
                "conversation_id", "is required: 1..128 characters of letters, digits and _.:-"
            )
        )
    if violations:
        raise invalid_argument(violations)
    return user, conversation_id


def export_format(value: int) -> int:
    """The export format, JSON when unspecified."""
    if value == pb.EXPORT_FORMAT_UNSPECIFIED:
        return pb.EXPORT_FORMAT_JSON
    if value not in (pb.EXPORT_FORMAT_JSON, pb.EXPORT_FORMAT_MARKDOWN):
        raise invalid_argument([FieldViolation("format", f"unknown export format {value}")])
    return value
