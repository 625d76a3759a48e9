"""Request validation: protobuf requests in, the project's typed requests out.

Every problem is reported at once, as INVALID_ARGUMENT with one BadRequest field violation per
bad field (field paths as in the proto).
"""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

from google.protobuf import struct_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.errors import FieldViolation, invalid_argument
from healthagent_service.upstream.events import ChatTurn, ToolOutput

MAX_ID_CHARS = 256
MAX_MESSAGE_BYTES = 32 * 1024
MAX_STATE_VARIABLES = 64
# Lifetimes the upstreams accept: ChatKit sessions 1..600 s, Realtime secrets 10..7200 s.
TTL_RANGES = {pb.SESSION_KIND_CHATKIT: (1, 600), pb.SESSION_KIND_REALTIME: (10, 7200)}
_SESSION_KINDS = frozenset(
    {pb.SESSION_KIND_UNSPECIFIED, pb.SESSION_KIND_CHATKIT, pb.SESSION_KIND_REALTIME}
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def _reject_non_json_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON does not, and upstreams would refuse them.
    raise ValueError(f"{name} is not JSON")


def _check_id(name: str, value: str, violations: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(name, "is required and must not be empty"))
        return
    if len(value) > MAX_ID_CHARS:
        violations.append(FieldViolation(name, f"must be at most {MAX_ID_CHARS} characters"))
    elif _CONTROL.search(value) or not value.strip():
        violations.append(FieldViolation(name, "must be printable text"))


def _state_variable(
    name: str, value: struct_pb2.Value, violations: list[FieldViolation]
) -> str | None:
    """The JSON text to send upstream for one state variable, or None if invalid."""
    kind = value.WhichOneof("kind")
    field = f"state_variables[{name!r}]"
    if kind == "string_value":
        return json.dumps(value.string_value)
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
        elif len(version) > 64 or _CONTROL.search(version):
            violations.append(FieldViolation("version", "must be at most 64 printable characters"))
    variables: list[tuple[str, str]] = []
    state_variables = request.state_variables
    if len(state_variables) > MAX_STATE_VARIABLES:
        violations.append(
            FieldViolation("state_variables", f"must have at most {MAX_STATE_VARIABLES} entries")
        )
    elif state_variables:  # usually empty: nothing to sort
        for name in sorted(state_variables):
            if not name or len(name) > 64 or _CONTROL.search(name):
                violations.append(
                    FieldViolation(
                        "state_variables", f"key {name!r} must be 1..64 printable characters"
                    )
                )
                continue
            encoded = _state_variable(name, state_variables[name], violations)
            if encoded is not None:
                variables.append((name, encoded))
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
        if not _CONVERSATION_ID.match(conversation_id):
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
    else:
        output = request.tool_output
        if not output.call_id:
            violations.append(FieldViolation("tool_output.call_id", "is required"))
        if len(output.output_json.encode()) > max_message_bytes:
            violations.append(
                FieldViolation(
                    "tool_output.output_json", f"must be at most {max_message_bytes} bytes"
                )
            )
        else:
            try:
                json.loads(output.output_json, parse_constant=_reject_non_json_constant)
            except ValueError:
                violations.append(FieldViolation("tool_output.output_json", "must be valid JSON"))
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
    if not _CONVERSATION_ID.match(conversation_id):
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
