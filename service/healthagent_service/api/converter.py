"""The one place where the project's events become protobuf messages."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.domain import events as ev
from healthagent_service.history import models
from healthagent_service.security.redaction import REDACTOR

_NOTICE_LEVELS = {
    ev.NoticeLevel.UNSPECIFIED: pb.NOTICE_LEVEL_UNSPECIFIED,
    ev.NoticeLevel.INFO: pb.NOTICE_LEVEL_INFO,
    ev.NoticeLevel.WARNING: pb.NOTICE_LEVEL_WARNING,
    ev.NoticeLevel.DANGER: pb.NOTICE_LEVEL_DANGER,
}

ChatResponse = pb.ChatResponse
Chunk = pb.Chunk


def _session(e: ev.SessionStarted) -> pb.ChatResponse:
    return ChatResponse(
        session=pb.SessionEvent(
            session_id=e.session_id,
            conversation_id=e.conversation_id,
            user=e.user,
            workflow_id=e.workflow_id,
        )
    )


def _text_done(e: ev.TextDone) -> pb.ChatResponse:
    return ChatResponse(text_done=pb.TextDone(text=e.text, item_id=e.item_id))


def _tool_call(e: ev.ToolCall) -> pb.ChatResponse:
    return ChatResponse(
        tool_call=pb.ToolCall(
            call_id=e.call_id, name=e.name, arguments_json=e.arguments_json, item_id=e.item_id
        )
    )


def _progress(e: ev.Progress) -> pb.ChatResponse:
    return ChatResponse(progress=pb.Progress(text=e.text, icon=e.icon))


def _notice(e: ev.Notice) -> pb.ChatResponse:
    # Notices can carry upstream error texts: redact them like log lines.
    return ChatResponse(
        notice=pb.Notice(
            level=_NOTICE_LEVELS[e.level],
            title=REDACTOR.redact(e.title),
            message=REDACTOR.redact(e.message),
        )
    )


def _response_done(e: ev.ResponseDone) -> pb.ChatResponse:
    done = pb.ResponseDone(text=e.text, awaiting_tool_output=e.awaiting_tool_output)
    if e.usage is not None:
        done.usage.CopyFrom(
            pb.Usage(
                input_tokens=e.usage.input_tokens,
                output_tokens=e.usage.output_tokens,
                total_tokens=e.usage.total_tokens,
            )
        )
    return ChatResponse(response_done=done)


def _passthrough(e: ev.Passthrough) -> pb.ChatResponse:
    return ChatResponse(passthrough=pb.Passthrough(type=e.type, json=e.json))


_CONVERTERS: dict[type[Any], Callable[[Any], pb.ChatResponse]] = {
    ev.SessionStarted: _session,
    ev.TextDone: _text_done,
    ev.ToolCall: _tool_call,
    ev.Progress: _progress,
    ev.Notice: _notice,
    ev.ResponseDone: _response_done,
    ev.Passthrough: _passthrough,
}


def to_chat_response(event: ev.ChatEvent) -> pb.ChatResponse:
    """The protobuf message for `event`. Text deltas, by far the most frequent, go first."""
    if type(event) is ev.TextDelta:
        # set in place: building a Chunk and passing it in copies it (4x the cost)
        response = ChatResponse()
        chunk = response.chunk
        chunk.text = event.text
        chunk.item_id = event.item_id
        return response
    return _CONVERTERS[type(event)](event)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for an aware datetime, exact to the microsecond."""
    converted = timestamp_pb2.Timestamp()
    converted.seconds, converted.nanos = ev.epoch_seconds_and_nanos(moment)
    return converted


_ROLES = {
    models.Role.USER: pb.MESSAGE_ROLE_USER,
    models.Role.ASSISTANT: pb.MESSAGE_ROLE_ASSISTANT,
    models.Role.TOOL: pb.MESSAGE_ROLE_TOOL,
}
_STATUSES = {
    models.Status.COMPLETE: pb.MESSAGE_STATUS_COMPLETE,
    models.Status.INCOMPLETE: pb.MESSAGE_STATUS_INCOMPLETE,
    models.Status.FAILED: pb.MESSAGE_STATUS_FAILED,
}


def to_message(message: models.Message) -> pb.ConversationMessage:
    """A stored message as protobuf."""
    converted = pb.ConversationMessage(
        id=message.id,
        role=_ROLES[message.role],
        text=message.text,
        status=_STATUSES[message.status],
        tool_call_id=message.tool_call_id,
        error_reason=message.error_reason,
        create_time=timestamp(message.created_at),
        update_time=timestamp(message.updated_at),
        tool_calls=[
            pb.ToolCall(
                call_id=str(c.get("call_id") or ""),
                name=str(c.get("name") or ""),
                arguments_json=str(c.get("arguments") or "{}"),
            )
            for c in message.tool_calls
        ],
    )
    if message.usage:
        converted.usage.CopyFrom(pb.Usage(**message.usage))
    return converted


def to_conversation(conversation: models.Conversation) -> pb.Conversation:
    """A stored conversation (with whatever messages it carries) as protobuf."""
    return pb.Conversation(
        id=conversation.id,
        user=conversation.user,
        upstream=conversation.upstream,
        upstream_id=conversation.upstream_id,
        title=conversation.title,
        create_time=timestamp(conversation.created_at),
        update_time=timestamp(conversation.updated_at),
        messages=[to_message(m) for m in conversation.messages],
    )
