"""Caller authentication over real sockets: JWTs (HS256 and JWKS with rotation), API keys."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from healthagent_service.emulator.http_server import HttpRequest, HttpResponse, HttpServer
from healthagent_service.security.auth import hash_api_key
from healthagent_service.server import check_exposure
from tests.support.calls import collect, status_details
from tests.support.service import Service, ServiceFactory, emulator_env, make_settings

JWT_SECRET = "supabase-jwt-secret-for-tests-0123456789"
ISSUER = "https://project.supabase.co/auth/v1"
AUDIENCE = "authenticated"
SERVICE_KEY = "hak_billing_service_key_0123456789"


def token(
    sub: str = "alice",
    *,
    key: Any = JWT_SECRET,
    algorithm: str = "HS256",
    kid: str | None = None,
    **claims: Any,
) -> str:
    payload = {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
        "iat": int(time.time()),
        **claims,
    }
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(value: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {value}"),)


@pytest.fixture
async def secured(emulator: ChatKitEmulator, start_service: ServiceFactory) -> Service:
    return await start_service(
        **emulator_env(
            emulator,
            HEALTHAGENT_AUTH_JWT_SECRET=JWT_SECRET,
            HEALTHAGENT_AUTH_JWT_ISSUER=ISSUER,
            HEALTHAGENT_AUTH_JWT_AUDIENCE=AUDIENCE,
            HEALTHAGENT_API_KEYS=[{"principal": "billing", "sha256": hash_api_key(SERVICE_KEY)}],
        )
    )


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        if hasattr(call, "__aiter__"):
            await collect(call)
        else:
            await call
    except grpc.aio.AioRpcError as error:
        details = status_details(error)
        return details.code, details.message
    return grpc.StatusCode.OK, ""


async def test_jwt_subject_is_the_user(secured: Service) -> None:
    stub = secured.stub
    events = await collect(
        stub.Chat(pb.ChatRequest(message="hi", user="alice"), metadata=bearer(token("alice")))
    )
    assert events[-1].WhichOneof("event") == "response_done"
    minted = await stub.MintSession(
        pb.MintSessionRequest(user="alice"), metadata=bearer(token("alice"))
    )
    assert minted.user == "alice"
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub.MintSession(pb.MintSessionRequest(user="bob"), metadata=bearer(token("alice")))
    assert status_details(other.value).code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as history:
        await stub.ListConversations(
            pb.ListConversationsRequest(user="bob"), metadata=bearer(token("alice"))
        )
    assert status_details(history.value).code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing"),
        ((("authorization", "Basic abc"),), "Bearer"),
        (bearer("not-a-token"), "neither"),
        (bearer(token(exp=int(time.time()) - 600)), "expired"),
        (bearer(token(key="another-secret-of-the-same-length-000")), "signature"),
        (bearer(token(aud="someone-else")), "audience"),
        (bearer(token(iss="https://evil.example")), "issuer"),
        (bearer(token(nbf=int(time.time()) + 600)), "not valid yet"),
        (bearer(jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256")), "'exp'"),
    ],
)
async def test_bad_credentials_are_unauthenticated(
    secured: Service, metadata: Any, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await secured.stub.MintSession(pb.MintSessionRequest(user="alice"), metadata=metadata)
    details = status_details(failure.value)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED and message in details.message
    assert JWT_SECRET not in details.message


async def test_every_healthagent_rpc_requires_credentials(secured: Service) -> None:
    stub = secured.stub
    calls = [
        stub.MintSession(pb.MintSessionRequest(user="u")),
        stub.Chat(pb.ChatRequest(message="hi", user="u")),
        stub.ListConversations(pb.ListConversationsRequest(user="u")),
        stub.GetConversation(pb.GetConversationRequest(user="u", conversation_id="c")),
        stub.DeleteConversation(pb.DeleteConversationRequest(user="u", conversation_id="c")),
        stub.ExportConversation(pb.ExportConversationRequest(user="u", conversation_id="c")),
        stub.RevokeSessions(pb.RevokeSessionsRequest(user="u")),
    ]
    for call in calls:
        assert (await code_of(call))[0] == grpc.StatusCode.UNAUTHENTICATED
    health: Any = health_pb2_grpc.HealthStub(secured.channel)  # health stays open
    answer = await health.Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_service_api_key_acts_for_any_user(secured: Service) -> None:
    minted = await secured.stub.MintSession(
        pb.MintSessionRequest(user="carol"), metadata=bearer(SERVICE_KEY)
    )
    assert minted.user == "carol"
    events = await collect(
        secured.stub.Chat(pb.ChatRequest(message="hi", user="dave"), metadata=bearer(SERVICE_KEY))
    )
    assert events[0].session.user == "dave"
    code, _ = await code_of(
        secured.stub.MintSession(
            pb.MintSessionRequest(user="carol"), metadata=bearer(SERVICE_KEY + "x")
        )
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED


class JwksServer:
    """A JWKS endpoint on loopback whose key set the test can rotate."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.server = HttpServer(self.handle)
        self.port = 0

    async def handle(self, request: HttpRequest) -> HttpResponse:
        self.requests += 1
        return HttpResponse(
            200, [("content-type", "application/json")], json.dumps({"keys": self.keys}).encode()
        )

    def publish(self, private_key: Any, kid: str, algorithm: str) -> None:
        public = json.loads(
            jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(private_key.public_key())
        )
        self.keys.append({**public, "kid": kid, "alg": algorithm, "use": "sig"})


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.port = await server.server.start("127.0.0.1", 0)
    yield server
    await server.server.close()


async def test_jwks_keys_are_cached_and_rotated(
    jwks: JwksServer, emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks.publish(rsa_key, "rsa-1", "RS256")
    service = await start_service(
        **emulator_env(
            emulator,
            HEALTHAGENT_AUTH_JWKS_URL=f"http://127.0.0.1:{jwks.port}/jwks.json",
            HEALTHAGENT_AUTH_JWKS_MIN_REFRESH_SECONDS=0,
            HEALTHAGENT_AUTH_JWT_AUDIENCE=AUDIENCE,
            HEALTHAGENT_AUTH_JWT_ISSUER=ISSUER,
        )
    )
    stub = service.stub
    for _ in range(3):
        await stub.MintSession(
            pb.MintSessionRequest(user="erin"),
            metadata=bearer(token("erin", key=rsa_key, algorithm="RS256", kid="rsa-1")),
        )
    assert jwks.requests == 1  # cached
    # Rotation: a new key appears; a token that names it makes the service refetch once.
    jwks.publish(ec_key, "ec-2", "ES256")
    await stub.MintSession(
        pb.MintSessionRequest(user="erin"),
        metadata=bearer(token("erin", key=ec_key, algorithm="ES256", kid="ec-2")),
    )
    assert jwks.requests == 2
    code, message = await code_of(
        stub.MintSession(pb.MintSessionRequest(user="erin"), metadata=bearer(token("erin")))
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and "HS256" in message  # no shared secret
    forged = token(
        "erin",
        key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        kid="rsa-1",
    )
    code, message = await code_of(
        stub.MintSession(pb.MintSessionRequest(user="erin"), metadata=bearer(forged))
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and "signature" in message


def test_no_auth_only_on_loopback() -> None:
    open_settings = make_settings()
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_exposure(open_settings, host)
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        with pytest.raises(ValueError, match="HEALTHAGENT_AUTH_JWT_SECRET"):
            check_exposure(open_settings, host)
    check_exposure(make_settings(HEALTHAGENT_AUTH_JWT_SECRET=JWT_SECRET), "0.0.0.0")


async def test_python_client_and_cli_send_the_token(secured: Service) -> None:
    import asyncio
    import subprocess

    from harness.processes import HEALTHAGENT, clean_env
    from healthagent.client import AsyncHealthAgentClient

    async with AsyncHealthAgentClient(secured.target, token=token("frank")) as client:
        assert (await client.mint_session("frank")).user == "frank"
    result = await asyncio.to_thread(
        subprocess.run,
        [HEALTHAGENT, "mint", "--target", secured.target, "--user", "gil"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(HEALTHAGENT_TOKEN=SERVICE_KEY),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user"] == "gil"


async def test_a_token_naming_the_wrong_kind_of_key_is_unauthenticated(
    jwks: JwksServer, emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks.publish(ec_key, "ec-1", "ES256")
    service = await start_service(
        **emulator_env(emulator, HEALTHAGENT_AUTH_JWKS_URL=f"http://127.0.0.1:{jwks.port}/j")
    )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    confused = token("x", key=rsa_key, algorithm="RS256", kid="ec-1")

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    odd_kid = ".".join(
        [
            part({"alg": "RS256", "kid": ["not", "a", "string"]}),
            part({"sub": "x", "exp": int(time.time()) + 60}),
            "c2ln",
        ]
    )
    for bad in (confused, odd_kid):
        code, _ = await code_of(
            service.stub.MintSession(pb.MintSessionRequest(user="x"), metadata=bearer(bad))
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
