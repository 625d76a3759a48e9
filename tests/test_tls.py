"""TLS for everyone, and mutual TLS for service callers, with certificates made on the spot."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.pki import Pki
from tests.support.service import ServiceFactory, emulator_env


async def mint(port: int, credentials: grpc.ChannelCredentials) -> pb.MintSessionResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        answer: pb.MintSessionResponse = await pb_grpc.HealthAgentStub(channel).MintSession(
            pb.MintSessionRequest(user="tls-user"), timeout=5
        )
        return answer


async def test_tls_and_mutual_tls(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    tls = {
        "HEALTHAGENT_TLS_CERT_FILE": str(pki.server_cert),
        "HEALTHAGENT_TLS_KEY_FILE": str(pki.server_key),
    }
    service = await start_service(**emulator_env(emulator, **tls))
    answer = await mint(service.running.port, grpc.ssl_channel_credentials(pki.ca))
    assert answer.user == "tls-user"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.running.port}") as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.HealthAgentStub(plain).MintSession(
                pb.MintSessionRequest(user="u"), timeout=3
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    mutual = await start_service(
        **emulator_env(
            emulator,
            **tls,
            HEALTHAGENT_TLS_CLIENT_CA_FILE=str(pki.ca_file),
            HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT=True,
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await mint(mutual.running.port, grpc.ssl_channel_credentials(pki.ca))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
    with_cert = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
    assert (await mint(mutual.running.port, with_cert)).user == "tls-user"


async def test_incomplete_tls_settings_refuse_to_start(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    for settings in (
        {"HEALTHAGENT_TLS_CERT_FILE": str(pki.server_cert)},
        {"HEALTHAGENT_TLS_CLIENT_CA_FILE": str(pki.ca_file)},
        {
            "HEALTHAGENT_TLS_CERT_FILE": str(pki.server_cert),
            "HEALTHAGENT_TLS_KEY_FILE": str(pki.server_key),
            "HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT": True,
        },
    ):
        with pytest.raises(ValueError, match="HEALTHAGENT_TLS"):
            await start_service(**emulator_env(emulator, **settings))
