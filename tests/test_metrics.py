"""The Prometheus endpoint: the figures are there, and no label carries a user or a secret."""

from __future__ import annotations

import grpc
import httpx
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect
from tests.support.service import TEST_API_KEY, ServiceFactory, emulator_env


def value(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("upstream", ["chatkit", "realtime"])
async def test_metrics_are_exported_without_users_or_secrets(
    upstream: str, emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(
        **emulator_env(
            emulator, HEALTHAGENT_UPSTREAM=upstream, HEALTHAGENT_METRICS_LISTEN="127.0.0.1:0"
        )
    )
    minted = await service.stub.MintSession(pb.MintSessionRequest(user="secret-user-name"))
    for _ in range(2):
        await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="secret-user-name")))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(service.stub.Chat(pb.ChatRequest(message="[drop]", user="secret-user-name")))
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{service.running.metrics_port}/metrics")).text
    assert value(text, "healthagent_active_streams") == 0
    assert value(text, f'healthagent_relayed_chunks_total{{upstream="{upstream}"}}') > 20
    assert value(text, "healthagent_time_to_first_chunk_seconds_count") == 3
    assert value(text, "healthagent_added_latency_seconds_count") == 2
    assert 'reason="UPSTREAM_STREAM_TRUNCATED"' in text
    assert value(text, 'healthagent_session_pool_mints_total{pool="chatkit"}') >= 1
    if upstream == "realtime":
        assert (
            value(text, 'healthagent_tokens_total{direction="output",workflow="gpt-realtime"}') > 0
        )
    for secret in ("secret-user-name", TEST_API_KEY, minted.client_secret):
        assert secret not in text
