"""Every error mapping, over real sockets: status code, ErrorInfo reason, BadRequest, RetryInfo."""

from __future__ import annotations

import socket
from typing import Any, cast

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect, event_kinds, status_details
from tests.support.service import Service, ServiceFactory, emulator_env

Code = grpc.StatusCode


async def chat_error(
    service_stub: pb_grpc.HealthAgentStub, request: pb.ChatRequest
) -> tuple[list[pb.ChatResponse], grpc.aio.AioRpcError]:
    """Events received before the failure, and the failure."""
    received: list[pb.ChatResponse] = []
    call = service_stub.Chat(request)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in call:
            received.append(event)
    return received, failure.value


async def mint_error(
    service_stub: pb_grpc.HealthAgentStub, request: pb.MintSessionRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await service_stub.MintSession(request)
    return failure.value


async def test_missing_key_names_the_setting(start_service: ServiceFactory) -> None:
    service = await start_service(HEALTHAGENT_UPSTREAM="chatkit", OPENAI_WORKFLOW_ID="wf_x")
    details = status_details(await mint_error(service.stub, pb.MintSessionRequest(user="u")))
    assert details.code == Code.FAILED_PRECONDITION
    assert details.reason == "UPSTREAM_API_KEY_MISSING" and "OPENAI_API_KEY" in details.message
    _, error = await chat_error(service.stub, pb.ChatRequest(message="hi", user="u"))
    assert status_details(error).reason == "UPSTREAM_API_KEY_MISSING"


async def test_missing_workflow_names_the_setting(start_service: ServiceFactory) -> None:
    service = await start_service(HEALTHAGENT_UPSTREAM="chatkit", OPENAI_API_KEY="sk-x")
    details = status_details(await mint_error(service.stub, pb.MintSessionRequest(user="u")))
    assert details.code == Code.FAILED_PRECONDITION
    assert details.reason == "WORKFLOW_ID_MISSING" and "OPENAI_WORKFLOW_ID" in details.message


async def test_bad_key_is_failed_precondition_and_not_echoed(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator, OPENAI_API_KEY="sk-wrong-secret"))
    error = await mint_error(service.stub, pb.MintSessionRequest(user="u"))
    details = status_details(error)
    assert details.code == Code.FAILED_PRECONDITION
    assert details.reason == "UPSTREAM_API_KEY_REJECTED" and "OPENAI_API_KEY" in details.message
    assert "sk-wrong-secret" not in str(error.details()) + str(error.trailing_metadata())
    _, chat_failure = await chat_error(service.stub, pb.ChatRequest(message="hi", user="u"))
    assert status_details(chat_failure).reason == "UPSTREAM_API_KEY_REJECTED"


async def test_unknown_workflow_is_failed_precondition(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator, OPENAI_WORKFLOW_ID="wf_missing"))
    details = status_details(await mint_error(service.stub, pb.MintSessionRequest(user="u")))
    assert details.code == Code.FAILED_PRECONDITION
    assert details.reason == "WORKFLOW_NOT_FOUND"
    assert "wf_missing" in details.message and "OPENAI_WORKFLOW_ID" in details.message


async def test_upstream_rate_limit_is_resource_exhausted_with_retry_info(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator))
    _, error = await chat_error(service.stub, pb.ChatRequest(message="[http 429]", user="u"))
    details = status_details(error)
    assert details.code == Code.RESOURCE_EXHAUSTED and details.reason == "UPSTREAM_RATE_LIMITED"
    assert details.retry_delay_seconds == 2.0  # the upstream's Retry-After


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_upstream_5xx_is_unavailable_with_retry_info(
    status: int, emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator))
    _, error = await chat_error(service.stub, pb.ChatRequest(message=f"[http {status}]", user="u"))
    details = status_details(error)
    assert details.code == Code.UNAVAILABLE and details.reason == "UPSTREAM_ERROR"
    assert details.metadata["upstream_status"] == str(status)
    assert details.retry_delay_seconds is not None


async def test_unreachable_upstream_is_unavailable(start_service: ServiceFactory) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = await start_service(
        HEALTHAGENT_UPSTREAM="chatkit",
        OPENAI_API_KEY="sk",
        OPENAI_WORKFLOW_ID="wf",
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
    )
    details = status_details(await mint_error(service.stub, pb.MintSessionRequest(user="u")))
    assert details.code == Code.UNAVAILABLE and details.reason == "UPSTREAM_UNAVAILABLE"
    assert details.retry_delay_seconds is not None
    _, error = await chat_error(service.stub, pb.ChatRequest(message="hi", user="u"))
    assert status_details(error).code == Code.UNAVAILABLE


async def test_invalid_requests_list_every_bad_field(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator))
    _, error = await chat_error(service.stub, pb.ChatRequest(message="   ", user=""))
    details = status_details(error)
    assert details.code == Code.INVALID_ARGUMENT and details.reason == "INVALID_REQUEST"
    assert {field for field, _ in details.field_violations} == {"message", "user"}
    _, error = await chat_error(service.stub, pb.ChatRequest(user="u"))
    assert status_details(error).field_violations[0][0] == "message"
    _, error = await chat_error(
        service.stub,
        pb.ChatRequest(user="u", tool_output=pb.ToolOutput(call_id="c", output_json="{not json")),
    )
    assert {f for f, _ in status_details(error).field_violations} == {
        "tool_output.output_json",
        "conversation_id",
    }
    mint = status_details(
        await mint_error(
            service.stub, pb.MintSessionRequest(user="", ttl_seconds=0, version="latest")
        )
    )
    assert {f for f, _ in mint.field_violations} == {"user", "ttl_seconds", "version"}
    big = pb.MintSessionRequest(user="u")
    for i in range(65):
        big.state_variables[f"k{i}"].string_value = "v"
    assert status_details(await mint_error(service.stub, big)).field_violations[0][0] == (
        "state_variables"
    )
    nested = pb.MintSessionRequest(user="u")
    nested.state_variables["list"].list_value.values.add().string_value = "x"
    assert status_details(await mint_error(service.stub, nested)).code == Code.INVALID_ARGUMENT
    assert emulator.stats.sessions_minted == 0  # nothing invalid went upstream


async def test_unknown_session_kind_is_invalid(service: Service) -> None:
    unknown = await mint_error(
        service.stub,
        pb.MintSessionRequest(user="u", kind=cast(Any, 99)),
    )
    assert status_details(unknown).code == Code.INVALID_ARGUMENT


async def test_unknown_conversation_is_not_found(service: Service) -> None:
    _, error = await chat_error(
        service.stub,
        pb.ChatRequest(message="hi", user="u", conversation_id="thr_doesnotexist"),
    )
    details = status_details(error)
    assert details.code == Code.NOT_FOUND and details.reason == "CONVERSATION_NOT_FOUND"


async def test_another_users_conversation_is_not_found(service: Service) -> None:
    stub = service.stub
    mine = await collect(stub.Chat(pb.ChatRequest(message="hi", user="alice")))
    _, error = await chat_error(
        stub,
        pb.ChatRequest(
            message="hi", user="mallory", conversation_id=mine[0].session.conversation_id
        ),
    )
    assert status_details(error).code == Code.NOT_FOUND


async def test_error_mid_stream_never_ends_ok(service: Service) -> None:
    received, error = await chat_error(
        service.stub,
        pb.ChatRequest(message="tell me [error]", user="u"),
    )
    assert event_kinds(received).count("chunk") == 2
    assert "response_done" not in event_kinds(received)
    details = status_details(error)
    assert details.code == Code.UNAVAILABLE and details.reason == "UPSTREAM_STREAM_ERROR"
    assert details.retry_delay_seconds is not None


async def test_dropped_connection_mid_stream_never_ends_ok(service: Service) -> None:
    received, error = await chat_error(
        service.stub,
        pb.ChatRequest(message="tell me [drop]", user="u"),
    )
    assert event_kinds(received).count("chunk") == 2
    assert "response_done" not in event_kinds(received) and "text_done" not in event_kinds(received)
    details = status_details(error)
    assert details.code == Code.UNAVAILABLE and details.reason == "UPSTREAM_STREAM_TRUNCATED"


async def test_non_retryable_upstream_error_is_internal(service: Service) -> None:
    received, error = await chat_error(service.stub, pb.ChatRequest(message="[fatal]", user="u"))
    assert event_kinds(received).count("chunk") == 2
    details = status_details(error)
    assert details.code == Code.INTERNAL and details.reason == "UPSTREAM_STREAM_ERROR"
    assert "Emulated fatal error." in details.message
    assert details.metadata["allow_retry"] == "false"


async def test_malformed_upstream_event_is_unavailable(service: Service) -> None:
    received, error = await chat_error(
        service.stub, pb.ChatRequest(message="[malformed]", user="u")
    )
    assert "response_done" not in event_kinds(received)
    details = status_details(error)
    assert details.code == Code.UNAVAILABLE and details.reason == "UPSTREAM_PROTOCOL_ERROR"
    assert details.retry_delay_seconds is not None


async def test_silent_upstream_times_out(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(
        **emulator_env(emulator, HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS=0.3)
    )
    _, error = await chat_error(service.stub, pb.ChatRequest(message="[slow]", user="u"))
    details = status_details(error)
    assert details.code == Code.UNAVAILABLE and details.reason == "UPSTREAM_TIMEOUT"


async def test_configured_retry_delay_applies_to_stream_failures(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator, HEALTHAGENT_RETRY_AFTER_SECONDS=7))
    for message in ("[error]", "[drop]", "[http 503]"):
        _, error = await chat_error(service.stub, pb.ChatRequest(message=message, user="u"))
        assert status_details(error).retry_delay_seconds == 7.0, message


async def test_wrong_base_url_names_the_setting(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(
        **emulator_env(emulator, OPENAI_BASE_URL=f"http://127.0.0.1:{emulator.port}")
    )
    details = status_details(await mint_error(service.stub, pb.MintSessionRequest(user="u")))
    assert details.code == Code.FAILED_PRECONDITION
    assert details.reason == "UPSTREAM_ENDPOINT_NOT_FOUND" and "OPENAI_BASE_URL" in details.message


async def test_tool_output_must_be_real_json(service: Service) -> None:
    for text in ("NaN", "Infinity", "[1, -Infinity]"):
        _, error = await chat_error(
            service.stub,
            pb.ChatRequest(
                user="u",
                conversation_id="thr_x",
                tool_output=pb.ToolOutput(call_id="c", output_json=text),
            ),
        )
        assert status_details(error).field_violations == [
            ("tool_output.output_json", "must be valid JSON")
        ]
