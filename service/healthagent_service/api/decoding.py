"""Requests that do not decode (invalid UTF-8 in a string field, corrupt wire bytes) reach the
handler as an `Undecodable`, so that the caller gets INVALID_ARGUMENT with `BadRequest` naming
the field, like any other bad input. Left to gRPC, a deserializer's exception ends the call
UNKNOWN, without details and with the exception's class in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from healthagent_service.errors import FieldViolation, HealthAgentError, invalid_argument


class Undecodable:
    """Stands in for a request whose bytes are not a valid encoding of its message."""

    __slots__ = ("error",)

    def __init__(self, error: HealthAgentError) -> None:
        self.error = error


def tolerant(message_class: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer for `message_class` that returns an `Undecodable` instead of
    raising."""
    parse = message_class.FromString
    descriptor: Any = message_class.DESCRIPTOR

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, or the parser's recursion limit
            violation = _find_violation(descriptor, data, "") or FieldViolation(
                "", f"the request is not a valid {descriptor.full_name} (corrupt protobuf)"
            )
            return Undecodable(invalid_argument([violation]))

    return deserialize


class TolerantRegistration:
    """What a generated `add_*Servicer_to_server` sees as the server: the service's method
    handlers are registered on `servers` through one generic handler, each with a `tolerant`
    deserializer (the generated generic handler, which would decode strictly, is dropped)."""

    def __init__(self, servers: Any, request_classes: dict[str, type[Message]]) -> None:
        self._servers = servers
        self._request_classes = request_classes  # method name -> request message class

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        """Dropped: `add_registered_method_handlers` gets the same handlers."""

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        handlers = {
            name: handler._replace(  # type: ignore[attr-defined]
                request_deserializer=tolerant(self._request_classes[name])
            )
            for name, handler in method_handlers.items()
        }
        self._servers.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, handlers),)
        )


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]  # IndexError past the end: corrupt
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _find_violation(descriptor: Any, data: bytes, prefix: str) -> FieldViolation | None:
    """The first field whose bytes are not valid (a string that is not UTF-8, or wire bytes
    that break off inside it), or None when the fault cannot be placed in a field."""
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            field: FieldDescriptor | None = descriptor.fields_by_number.get(number)
            name = prefix + field.name if field is not None else ""
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk = data[position : position + length]
                position += length
                if len(chunk) < length:
                    return FieldViolation(name, "is cut short (corrupt protobuf)") if name else None
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode()
                    except UnicodeDecodeError:
                        return FieldViolation(name, "is not valid UTF-8")
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    message: Any = field.message_type
                    if message.GetOptions().map_entry:  # a map's entry: name the map
                        inner = _find_violation(message, chunk, "")
                        if inner is not None:
                            return FieldViolation(name, inner.description)
                    else:
                        inner = _find_violation(message, chunk, f"{name}.")
                        if inner is not None:
                            return inner
            else:
                return None  # groups, or a wire type that does not exist
    except (IndexError, ValueError, RecursionError):
        return None
    return None
