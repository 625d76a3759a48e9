"""A small client for the HealthAgent service: async (`AsyncHealthAgentClient`) and sync
(`HealthAgentClient`), both yielding the typed `ChatResponse` events.

    async with AsyncHealthAgentClient("127.0.0.1:50051") as client:
        async for event in client.chat("How did I sleep?", user="user-123"):
            if event.WhichOneof("event") == "chunk":
                print(event.chunk.text, end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import struct_pb2

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# Mobile-friendly keepalive; the server permits pings this often.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)
Metadata = Sequence[tuple[str, str]]
ChannelOptions = Sequence[tuple[str, Any]]


def _channel_options(extra: ChannelOptions) -> list[tuple[str, Any]]:
    """CHANNEL_OPTIONS with the caller's on top (one value per name: a caller's replaces ours)."""
    return list({**dict(CHANNEL_OPTIONS), **dict(extra)}.items())


def _with_token(metadata: Metadata, token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata, plus `authorization: Bearer <token>` for a token (JWT or API key)."""
    pairs = tuple(metadata)
    return (*pairs, ("authorization", f"Bearer {token}")) if token else pairs


def _state_variables(
    values: Mapping[str, str | int | float | bool] | None,
) -> dict[str, struct_pb2.Value]:
    converted = {}
    for name, value in (values or {}).items():
        item = struct_pb2.Value()
        if isinstance(value, bool):
            item.bool_value = value
        elif isinstance(value, (int, float)):
            item.number_value = value
        else:
            item.string_value = value
        converted[name] = item
    return converted


def mint_session_request(
    user: str,
    *,
    device_id: str = "",
    version: str | None = None,
    state_variables: Mapping[str, str | int | float | bool] | None = None,
    ttl_seconds: int | None = None,
    kind: int = pb.SESSION_KIND_CHATKIT,
) -> pb.MintSessionRequest:
    """Build a MintSessionRequest."""
    request = pb.MintSessionRequest(
        user=user,
        device_id=device_id,
        kind=kind,  # type: ignore[arg-type]
        state_variables=_state_variables(state_variables),
    )
    if version is not None:
        request.version = version
    if ttl_seconds is not None:
        request.ttl_seconds = ttl_seconds
    return request


def chat_request(
    message: str | None,
    *,
    user: str,
    device_id: str = "",
    conversation_id: str | None = None,
    tool_call_id: str | None = None,
    tool_output: Any = None,
) -> pb.ChatRequest:
    """Build a ChatRequest: text, or (with `tool_call_id`) the answer to a tool call."""
    request = pb.ChatRequest(user=user, device_id=device_id)
    if tool_call_id is not None:
        request.tool_output.CopyFrom(
            pb.ToolOutput(call_id=tool_call_id, output_json=json.dumps(tool_output))
        )
    elif message is not None:
        request.message = message
    if conversation_id is not None:
        request.conversation_id = conversation_id
    return request


class AsyncHealthAgentClient:
    """grpc.aio client. Use as an async context manager, or call `close()`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        # channel_options: gRPC channel arguments, e.g. ("grpc.lb_policy_name", "round_robin")
        # with a dns:/// target for client-side balancing (docs/deploy.md, "Balancing gRPC")
        options = _channel_options(channel_options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options)
            if credentials
            else grpc.aio.insecure_channel(target, options)
        )
        self._stub = pb_grpc.HealthAgentStub(self._channel)
        self._metadata = _with_token(metadata, token)

    async def __aenter__(self) -> AsyncHealthAgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def mint_session(
        self, user: str, *, timeout: float | None = 30.0, **options: Any
    ) -> pb.MintSessionResponse:
        """Mint (or reuse) an upstream session for `user`; see `mint_session_request`."""
        response: pb.MintSessionResponse = await self._stub.MintSession(
            mint_session_request(user, **options), timeout=timeout, metadata=self._metadata
        )
        return response

    async def chat(
        self, message: str | None, *, user: str, timeout: float | None = 300.0, **options: Any
    ) -> AsyncIterator[pb.ChatResponse]:
        """Send one turn and yield its events; raises `grpc.aio.AioRpcError` on failure."""
        call = self._stub.Chat(
            chat_request(message, user=user, **options), timeout=timeout, metadata=self._metadata
        )
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()  # no-op when complete; closes the stream if the caller stops early


class HealthAgentClient:
    """Blocking client with the same methods, for scripts and sync services."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        # channel_options: gRPC channel arguments, e.g. ("grpc.lb_policy_name", "round_robin")
        # with a dns:/// target for client-side balancing (docs/deploy.md, "Balancing gRPC")
        options = _channel_options(channel_options)
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self._stub = pb_grpc.HealthAgentStub(self._channel)
        self._metadata = _with_token(metadata, token)

    def __enter__(self) -> HealthAgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def mint_session(
        self, user: str, *, timeout: float | None = 30.0, **options: Any
    ) -> pb.MintSessionResponse:
        """Mint (or reuse) an upstream session for `user`."""
        response: pb.MintSessionResponse = self._stub.MintSession(
            mint_session_request(user, **options), timeout=timeout, metadata=self._metadata
        )
        return response

    def chat(
        self, message: str | None, *, user: str, timeout: float | None = 300.0, **options: Any
    ) -> Iterator[pb.ChatResponse]:
        """Send one turn and yield its events; raises `grpc.RpcError` on failure."""
        call = self._stub.Chat(
            chat_request(message, user=user, **options), timeout=timeout, metadata=self._metadata
        )
        try:
            yield from call
        finally:
            call.cancel()
