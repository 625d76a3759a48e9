"""Conversation exports: one JSON document, or a readable Markdown transcript."""

from __future__ import annotations

import json
import re
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
    """A transcript people can read; incomplete and failed answers are marked.

    Every text that came from a user or an upstream (messages, which the user can steer the
    assistant to repeat, tool results and calls, ids, the title) is rendered so that it cannot
    pass for the transcript's own structure: whole texts in fenced blocks that nothing inside
    can close, short ones on one line with Markdown's punctuation escaped."""
    title = _inline(conversation.title) if conversation.title else "Conversation"
    lines = [
        f"# {title}",
        "",
        f"- Conversation: {_inline(conversation.id)}",
        f"- Started: {conversation.created_at.isoformat()}",
        f"- Updated: {conversation.updated_at.isoformat()}",
        "",
    ]
    for message in conversation.messages:
        heading = _ROLE_TITLES[message.role]
        if message.status is not Status.COMPLETE:
            heading += f" ({message.status.value}"
            heading += f": {_inline(message.error_reason)})" if message.error_reason else ")"
        lines += [f"## {heading}", f"_{message.created_at.isoformat()}_", ""]
        if message.role is Role.TOOL:
            lines += [
                f"Answer to {_inline(message.tool_call_id)}:",
                "",
                _fenced(message.text, "json"),
            ]
        elif message.text:
            lines.append(_fenced(message.text, "text"))
        else:
            lines.append("_(no text)_")
        for call in message.tool_calls:
            name, call_id = _inline(str(call.get("name"))), _inline(str(call.get("call_id")))
            lines += [
                "",
                f"Tool call {name} ({call_id}):",
                "",
                _fenced(str(call.get("arguments")), "json"),
            ]
        lines.append("")
    return "\n".join(lines)


# CommonMark lets any ASCII punctuation be escaped with a backslash, and then it is text
_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")


def _inline(text: str) -> str:
    """`text` on one line, every Markdown punctuation character escaped."""
    return _PUNCTUATION.sub(r"\\\1", _LINE_BREAKS.sub(" ", text)).strip()


def _fenced(text: str, info: str) -> str:
    """`text` in a fenced code block whose fence is longer than any run of backticks in it:
    only a line of at least as many backticks closes a fence, so nothing in it can."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"
