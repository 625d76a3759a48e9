"""TLS for everyone, and mutual TLS for service callers, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.conftest import ServiceFactory, emulator_env


def _pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


def _certificate(
    subject: str, key: Any, issuer: x509.Name | None, issuer_key: Any, *, ca: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA, a server certificate for 127.0.0.1, and a client certificate."""

    def __init__(self, directory: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("HealthAgent test CA", ca_key, None, ca_key, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = ca.public_bytes(serialization.Encoding.PEM)
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.ca_file = directory / "ca.pem"
        self.server_cert.write_bytes(
            _certificate("127.0.0.1", server_key, ca.subject, ca_key).public_bytes(
                serialization.Encoding.PEM
            )
        )
        self.server_key.write_bytes(_pem(server_key))
        self.ca_file.write_bytes(self.ca)
        self.client_cert = _certificate(
            "billing-service", client_key, ca.subject, ca_key
        ).public_bytes(serialization.Encoding.PEM)
        self.client_key = _pem(client_key)


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
