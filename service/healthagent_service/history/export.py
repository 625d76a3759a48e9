"""Conversation exports: one JSON document, or a readable Markdown transcript."""

from __future__ import annotations

import json
from typing import Any

from healthagent_service.history.models import Conversation, Role, Status

_ROLE_TITLES = {Role.USER: "User", Role.ASSISTANT: "Assistant", Role.TOOL: "Tool result"}


def to_json(conversation: Conversation) -> str:
    """The conversation and its messages as JSON (timestamps in ISO 8601, UTC)."""
    document: dict[str, Any] = {
        "id": conversation.id,
        "user": conversation.user,
        "upstream": conversation.upstream,
        "title": conversation.title,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
        "messages": [
            {
                "id": m.id,
                "role": m.role.value,
                "text": m.text,
                "status": m.status.value,
                "tool_calls": m.tool_calls,
                "tool_call_id": m.tool_call_id or None,
                "usage": m.usage,
                "error_reason": m.error_reason or None,
                "created_at": m.created_at.isoformat(),
            }
            for m in conversation.messages
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


def to_markdown(conversation: Conversation) -> str:
    """A transcript people can read; incomplete and failed answers are marked."""
    title = conversation.title or "Conversation"
    lines = [
        f"# {title}",
        "",
        f"- Conversation: `{conversation.id}`",
        f"- Started: {conversation.created_at.isoformat()}",
        f"- Updated: {conversation.updated_at.isoformat()}",
        "",
    ]
    for message in conversation.messages:
        heading = _ROLE_TITLES[message.role]
        if message.status is not Status.COMPLETE:
            heading += f" ({message.status.value}"
            heading += f": {message.error_reason})" if message.error_reason else ")"
        lines += [f"## {heading}", f"_{message.created_at.isoformat()}_", ""]
        if message.role is Role.TOOL:
            lines += [f"Answer to `{message.tool_call_id}`:", "", "```json", message.text, "```"]
        else:
            lines.append(message.text or "_(no text)_")
        for call in message.tool_calls:
            lines += [
                "",
                f"Tool call `{call.get('name')}` (`{call.get('call_id')}`):",
                "",
                "```json",
                str(call.get("arguments")),
                "```",
            ]
        lines.append("")
    return "\n".join(lines)
