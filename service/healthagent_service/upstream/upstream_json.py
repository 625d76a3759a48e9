"""Decoding the upstreams' JSON events: once per relayed chunk, so the hot path's largest cost.

msgspec decodes a ChatKit text delta in a third of the time `json` takes (integers exact, like
`json`'s). The few documents it refuses and `json` takes (NaN and Infinity, lone surrogate
escapes, numbers past a double's range) are handed to `json`, so every event decodes exactly as
`json.loads` decodes it, errors included (a `ValueError`)
(docs/decisions/0002-msgspec-decoding.md).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

# `decode_json` in two steps, for a hot loop to call without a function of its own between:
# `decode_fast`, and `decode_with_json` when it raises `FastDecodeError`.
decode_fast = msgspec.json.Decoder().decode
FastDecodeError = msgspec.DecodeError
_decode_with_json = json.JSONDecoder().raw_decode


def decode_json(data: bytes | str) -> Any:
    """`json.loads(data)` for UTF-8 bytes or text (the only encoding SSE and WebSocket text
    frames allow, so there is no encoding to detect), faster."""
    try:
        return decode_fast(data)
    except FastDecodeError:
        return decode_with_json(data)
    except RecursionError:  # msgspec raises it for JSON nested past its limit, as `json` does
        raise ValueError("JSON nested too deep") from None


def decode_with_json(data: bytes | str) -> Any:
    """`json.loads(data)`, for what `decode_fast` refuses."""
    text = data.decode() if isinstance(data, bytes) else data
    start = len(text) - len(text.lstrip()) if text[:1].isspace() else 0
    try:
        value, end = _decode_with_json(text, start)
    except RecursionError:  # an upstream's JSON nested past the parser's limit: not readable
        raise ValueError("JSON nested too deep") from None
    if end != len(text) and text[end:].strip():
        raise ValueError(f"extra data after the JSON value at {end}")
    return value


def upstream_id(value: object, name: str) -> str:
    """`value`, an id an upstream answered (a session, thread or call id, a client secret), if
    the service can keep it and send it on as it is: a string without a NUL (PostgreSQL text
    cannot hold one; SQLite can, so the backends would differ) or a lone surrogate escape (not
    Unicode: neither store nor protobuf can encode it). ValueError otherwise, which the callers
    turn into UPSTREAM_PROTOCOL_ERROR. Unlike upstream text (`history.store.storable`), an id is
    not mended: with U+FFFD in place of the character it would name something else."""
    if not isinstance(value, str):
        raise ValueError(f"a {name} that is a string")
    if "\x00" in value:
        raise ValueError(f"a {name} without a NUL")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"a {name} that is Unicode (not a lone surrogate)") from None
    return value
