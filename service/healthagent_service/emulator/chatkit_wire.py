"""ChatKit events as the official `openai-chatkit` SDK serializes them.

Field order, omitted nulls and compact separators match `ChatKitServer._serialize`
(pydantic `model_dump_json(by_alias=True, exclude_none=True)`), so a client sees the same bytes
from the emulator as from a real ChatKit server running the same script.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from healthagent_service.emulator.script import NOTICE, PROGRESS_TEXT, TOOL_ARGUMENTS, TOOL_NAME


def sse(event: dict[str, Any]) -> bytes:
    """One SSE frame: `data: <json>` and a blank line."""
    return (
        b"data: "
        + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        + (b"\n\n")
    )


def now_iso() -> str:
    """A timestamp in the SDK's format (naive local time, microseconds)."""
    return datetime.now().isoformat()


def thread_created(thread_id: str, created_at: str) -> dict[str, Any]:
    return {
        "type": "thread.created",
        "thread": {
            "id": thread_id,
            "created_at": created_at,
            "status": {"type": "active"},
            "metadata": {},
            "items": {"data": [], "has_more": False},
        },
    }


def _item_head(item_id: str, thread_id: str, created_at: str, item_type: str) -> dict[str, Any]:
    """The fields every thread item starts with, in the SDK's order."""
    return {"id": item_id, "thread_id": thread_id, "created_at": created_at, "type": item_type}


def user_message_done(item_id: str, thread_id: str, created_at: str, text: str) -> dict[str, Any]:
    return {
        "type": "thread.item.done",
        "item": {
            **_item_head(item_id, thread_id, created_at, "user_message"),
            "content": [{"type": "input_text", "text": text}],
            "attachments": [],
            "quoted_text": "",
            "inference_options": {},
        },
    }


def stream_options() -> dict[str, Any]:
    return {"type": "stream_options", "stream_options": {"allow_cancel": True}}


def progress() -> dict[str, Any]:
    return {"type": "progress_update", "text": PROGRESS_TEXT}


def notice() -> dict[str, Any]:
    level, title, message = NOTICE
    return {"type": "notice", "level": level, "message": message, "title": title}


def _assistant_item(
    item_id: str, thread_id: str, created_at: str, text: str | None
) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {**_item_head(item_id, thread_id, created_at, "assistant_message"), "content": content}


def _output_text(text: str) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text"}


def assistant_added(item_id: str, thread_id: str, created_at: str) -> dict[str, Any]:
    return {
        "type": "thread.item.added",
        "item": _assistant_item(item_id, thread_id, created_at, None),
    }


def content_part_added(item_id: str) -> dict[str, Any]:
    return {
        "type": "thread.item.updated",
        "item_id": item_id,
        "update": {
            "type": "assistant_message.content_part.added",
            "content_index": 0,
            "content": _output_text(""),
        },
    }


def text_delta(item_id: str, delta: str) -> dict[str, Any]:
    return {
        "type": "thread.item.updated",
        "item_id": item_id,
        "update": {
            "type": "assistant_message.content_part.text_delta",
            "content_index": 0,
            "delta": delta,
        },
    }


def text_delta_prefix(item_id: str) -> tuple[bytes, bytes]:
    """The bytes around a delta's JSON string, so the hot loop only encodes the delta."""
    marker = "\x00"
    frame = sse(text_delta(item_id, marker)).decode()
    head, tail = frame.split(json.dumps(marker), 1)
    return head.encode(), tail.encode()


def content_part_done(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "thread.item.updated",
        "item_id": item_id,
        "update": {
            "type": "assistant_message.content_part.done",
            "content_index": 0,
            "content": _output_text(text),
        },
    }


def assistant_done(item_id: str, thread_id: str, created_at: str, text: str) -> dict[str, Any]:
    return {
        "type": "thread.item.done",
        "item": _assistant_item(item_id, thread_id, created_at, text),
    }


def tool_call_done(item_id: str, thread_id: str, created_at: str, call_id: str) -> dict[str, Any]:
    return {
        "type": "thread.item.done",
        "item": {
            **_item_head(item_id, thread_id, created_at, "client_tool_call"),
            "status": "pending",
            "call_id": call_id,
            "name": TOOL_NAME,
            "arguments": TOOL_ARGUMENTS,
        },
    }


def stream_error() -> dict[str, Any]:
    return {"type": "error", "code": "stream.error", "allow_retry": True}


def fatal_error(message: str) -> dict[str, Any]:
    return {"type": "error", "code": "custom", "message": message, "allow_retry": False}


def error_envelope(
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    type_: str = "invalid_request_error",
) -> bytes:
    """The OpenAI error body."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()
