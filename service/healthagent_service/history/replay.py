"""Stored messages -> the Realtime items that replay them into a new session."""

from __future__ import annotations

from typing import Any

from healthagent_service.history.models import Conversation, Role, Status
from healthagent_service.history.store import ConversationStore
from healthagent_service.upstream import realtime_events as rt


def realtime_items(conversation: Conversation) -> tuple[list[dict[str, Any]], set[str]]:
    """Whole turns only (incomplete or failed answers are not replayed), and the call ids the
    last answer left pending."""
    items: list[dict[str, Any]] = []
    pending: set[str] = set()
    messages = conversation.messages
    # Messages come in pairs: the caller's (user text or tool output), then the answer.
    for asked, answer in zip(messages[::2], messages[1::2], strict=False):
        if answer.role is not Role.ASSISTANT or answer.status is not Status.COMPLETE:
            continue
        if asked.role is Role.TOOL:
            items.append(rt.function_call_output(asked.tool_call_id, asked.text))
        else:
            items.append(rt.user_message(asked.text))
        if answer.text:
            items.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": answer.text}],
                }
            )
        for call in answer.tool_calls:
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("call_id"),
                    "name": call.get("name"),
                    "arguments": call.get("arguments"),
                }
            )
        pending = {str(call.get("call_id")) for call in answer.tool_calls}
    return items, pending


def transcript_loader(store: ConversationStore) -> Any:
    """A `TranscriptLoader` for the Realtime upstream, reading from `store`."""

    async def load(user: str, conversation_id: str) -> tuple[list[dict[str, Any]], set[str]] | None:
        conversation = await store.get_conversation(user, conversation_id)
        if conversation is None or conversation.upstream != "realtime":
            return None
        return realtime_items(conversation)

    return load
