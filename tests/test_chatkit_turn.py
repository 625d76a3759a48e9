"""ChatKitTurn: how ChatKit events become the project's events, and when a turn is complete."""

from __future__ import annotations

import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from healthagent_service.domain import events as ev
from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.upstream.chatkit_events import ChatKitTurn

NEW = ev.SessionStarted("cksess_1", "", "u", "wf")
CONTINUED = ev.SessionStarted("cksess_1", "thr_1", "u", "wf")


def data(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def added(item_id: str, kind: str = "assistant_message") -> bytes:
    return data({"type": "thread.item.added", "item": {"id": item_id, "type": kind}})


def done(item_id: str, text: str) -> bytes:
    return data(
        {
            "type": "thread.item.done",
            "item": {
                "id": item_id,
                "type": "assistant_message",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            },
        }
    )


def test_new_thread_must_start_with_thread_created() -> None:
    turn = ChatKitTurn(NEW)
    assert turn.start() is None
    with pytest.raises(HealthAgentError) as failure:
        turn.translate(data({"type": "progress_update", "text": "x"}))
    assert failure.value.reason == "UPSTREAM_PROTOCOL_ERROR"
    turn = ChatKitTurn(NEW)
    session = turn.translate(data({"type": "thread.created", "thread": {"id": "thr_9"}}))
    assert session == ev.SessionStarted("cksess_1", "thr_9", "u", "wf")


def test_complete_turn_with_two_messages() -> None:
    turn = ChatKitTurn(CONTINUED)
    assert turn.start() == CONTINUED
    out = [
        turn.translate(added("m1")),
        turn.translate(
            data(
                {
                    "type": "thread.item.updated",
                    "item_id": "m1",
                    "update": {
                        "type": "assistant_message.content_part.text_delta",
                        "content_index": 0,
                        "delta": "Hi",
                    },
                }
            )
        ),
        turn.translate(done("m1", "Hi")),
        turn.translate(added("m2")),
        turn.translate(done("m2", "Bye")),
    ]
    assert out == [
        None,
        ev.TextDelta("Hi", "m1"),
        ev.TextDone("Hi", "m1"),
        None,
        ev.TextDone("Bye", "m2"),
    ]
    assert turn.finish() == ev.ResponseDone("Hi\n\nBye", None, False)


def test_unfinished_item_means_truncated() -> None:
    turn = ChatKitTurn(CONTINUED)
    turn.translate(added("m1"))
    with pytest.raises(HealthAgentError) as failure:
        turn.finish()
    assert failure.value.kind is ErrorKind.UNAVAILABLE
    assert failure.value.reason == "UPSTREAM_STREAM_TRUNCATED"


def test_empty_body_means_truncated() -> None:
    with pytest.raises(HealthAgentError) as failure:
        ChatKitTurn(CONTINUED).finish()
    assert failure.value.reason == "UPSTREAM_STREAM_TRUNCATED"


@pytest.mark.parametrize(
    ("allow_retry", "kind"), [(True, ErrorKind.UNAVAILABLE), (False, ErrorKind.INTERNAL)]
)
def test_error_event(allow_retry: bool, kind: ErrorKind) -> None:
    turn = ChatKitTurn(CONTINUED)
    with pytest.raises(HealthAgentError) as failure:
        turn.translate(
            data({"type": "error", "code": "custom", "message": "no", "allow_retry": allow_retry})
        )
    assert failure.value.kind is kind and "no" in failure.value.message


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1]", b'{"no_type": 1}', b'{"type": "thread.item.updated"}']
)
def test_malformed_events_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(HealthAgentError) as failure:
        ChatKitTurn(CONTINUED).translate(raw)
    assert failure.value.reason == "UPSTREAM_PROTOCOL_ERROR"


def test_other_events_pass_through_and_unknown_types_are_logged_once() -> None:
    turn = ChatKitTurn(CONTINUED)
    widget = data({"type": "thread.item.done", "item": {"id": "w1", "type": "widget"}})
    assert turn.translate(widget) == ev.Passthrough("thread.item.done", widget.decode())
    effect = data({"type": "client_effect", "name": "confetti", "data": {}})
    assert turn.translate(effect) == ev.Passthrough("client_effect", effect.decode())
    future = data({"type": "thread.future_event_type", "x": 1})
    with capture_logs() as logs:
        assert turn.translate(future) == ev.Passthrough("thread.future_event_type", future.decode())
        turn.translate(future)
    assert [entry["event_type"] for entry in logs] == ["thread.future_event_type"]
    notice = turn.translate(data({"type": "notice", "level": "danger", "message": "m"}))
    assert notice == ev.Notice(ev.NoticeLevel.DANGER, "m", "")
    assert turn.finish().text == ""


def test_pending_client_tool_call() -> None:
    turn = ChatKitTurn(CONTINUED)
    call = turn.translate(
        data(
            {
                "type": "thread.item.done",
                "item": {
                    "id": "tc_1",
                    "type": "client_tool_call",
                    "status": "pending",
                    "call_id": "call_1",
                    "name": "get_steps",
                    "arguments": {"days": 7},
                },
            }
        )
    )
    assert call == ev.ToolCall("call_1", "get_steps", '{"days": 7}', "tc_1")
    assert turn.finish().awaiting_tool_output


def test_withdrawn_and_replaced_messages_do_not_survive() -> None:
    turn = ChatKitTurn(CONTINUED)
    turn.translate(added("m1"))
    turn.translate(done("m1", "Take 10x your usual dose."))
    removed = data({"type": "thread.item.removed", "item_id": "m1"})
    assert turn.translate(removed) == ev.Passthrough("thread.item.removed", removed.decode())
    turn.translate(added("m2"))
    turn.translate(done("m2", "draft"))
    replacement = {
        "type": "thread.item.replaced",
        "item": {
            "id": "m2",
            "type": "assistant_message",
            "content": [{"type": "output_text", "text": "final"}],
        },
    }
    turn.translate(data(replacement))
    assert turn.finish().text == "final"


def test_items_other_than_messages_may_stay_open() -> None:
    # The SDK leaves a reasoning workflow item open across a client tool call.
    turn = ChatKitTurn(CONTINUED)
    turn.translate(added("wf_1", kind="workflow"))
    turn.translate(added("m1"))
    turn.translate(done("m1", "Let me check."))
    assert turn.finish().text == "Let me check."


def test_nothing_may_come_before_thread_created() -> None:
    turn = ChatKitTurn(NEW)
    delta = data(
        {
            "type": "thread.item.updated",
            "item_id": "m1",
            "update": {
                "type": "assistant_message.content_part.text_delta",
                "content_index": 0,
                "delta": "x",
            },
        }
    )
    with pytest.raises(HealthAgentError) as failure:
        turn.translate(delta)
    assert failure.value.reason == "UPSTREAM_PROTOCOL_ERROR"
