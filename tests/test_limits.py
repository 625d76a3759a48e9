"""Per-user limits and input limits, over real sockets (Redis on this machine for shared ones)."""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.conftest import ServiceFactory, collect, emulator_env, status_details

REDIS_URL = os.environ.get("HEALTHAGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def require_redis() -> None:
    """Skip when Redis is not running here; under CI, fail loudly instead."""
    client = redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as exc:
        message = f"Redis at {REDIS_URL} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        await client.aclose()


async def mint_codes(stub: Any, user: str, count: int) -> list[grpc.StatusCode]:
    codes = []
    for _ in range(count):
        try:
            await stub.MintSession(pb.MintSessionRequest(user=user))
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            details = status_details(error)
            assert details.reason == "USER_RATE_LIMITED"
            assert details.retry_delay_seconds is not None and details.retry_delay_seconds > 0
            codes.append(error.code())
    return codes


async def test_request_rate_per_user(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(
        **emulator_env(
            emulator, HEALTHAGENT_RATE_LIMIT_PER_MINUTE=6, HEALTHAGENT_RATE_LIMIT_BURST=3
        )
    )
    codes = await mint_codes(service.stub, "fast", 5)
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert await mint_codes(service.stub, "someone-else", 1) == [grpc.StatusCode.OK]


async def test_concurrent_streams_per_user(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    service = await start_service(**emulator_env(emulator, HEALTHAGENT_MAX_STREAMS_PER_USER=1))
    first = service.stub.Chat(pb.ChatRequest(message="[chunks=3000]", user="busy"))
    async for event in first:
        if event.WhichOneof("event") == "chunk":
            break
    with pytest.raises(grpc.aio.AioRpcError) as second:
        await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="busy")))
    details = status_details(second.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "USER_STREAM_LIMIT" and details.retry_delay_seconds
    other = await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="calm")))
    assert other[-1].WhichOneof("event") == "response_done"
    first.cancel()
    await asyncio.sleep(0.2)  # the slot comes back when the stream ends
    again = await collect(service.stub.Chat(pb.ChatRequest(message="hi", user="busy")))
    assert again[-1].WhichOneof("event") == "response_done"


async def test_two_replicas_share_one_limit_in_redis(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    await require_redis()
    shared = emulator_env(
        emulator,
        HEALTHAGENT_REDIS_URL=REDIS_URL,
        HEALTHAGENT_REDIS_PREFIX=f"test-{secrets.token_hex(6)}",
        HEALTHAGENT_RATE_LIMIT_PER_MINUTE=6,
        HEALTHAGENT_RATE_LIMIT_BURST=4,
        HEALTHAGENT_MAX_STREAMS_PER_USER=1,
    )
    first = await start_service(**shared)
    second = await start_service(**shared)
    codes = []
    for stub in (first.stub, second.stub, first.stub, second.stub, first.stub, second.stub):
        codes += await mint_codes(stub, "shared-user", 1)
    assert codes.count(grpc.StatusCode.OK) == 4  # one bucket, whichever replica is asked
    # one stream slot across both replicas
    stream = first.stub.Chat(pb.ChatRequest(message="[chunks=3000]", user="streamer"))
    async for event in stream:
        if event.WhichOneof("event") == "chunk":
            break
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(second.stub.Chat(pb.ChatRequest(message="hi", user="streamer")))
    assert status_details(refused.value).reason == "USER_STREAM_LIMIT"
    stream.cancel()


async def test_input_limits(emulator: ChatKitEmulator, start_service: ServiceFactory) -> None:
    service = await start_service(**emulator_env(emulator, HEALTHAGENT_MAX_MESSAGE_BYTES=1024))
    with pytest.raises(grpc.aio.AioRpcError) as long_message:
        await collect(service.stub.Chat(pb.ChatRequest(message="x" * 1025, user="u")))
    assert status_details(long_message.value).field_violations[0][0] == "message"
    for bad_user in ("u" * 257, "tab\there", "nul\x00", "   "):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await service.stub.MintSession(pb.MintSessionRequest(user=bad_user))
        assert status_details(failure.value).field_violations[0][0] == "user"
    # Oversized gRPC messages are refused by the server before they are parsed.
    with pytest.raises(grpc.aio.AioRpcError) as huge:
        await collect(service.stub.Chat(pb.ChatRequest(message="x" * (2 * 1024 * 1024), user="u")))
    assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # So is oversized metadata.
    with pytest.raises(grpc.aio.AioRpcError) as metadata:
        await service.stub.MintSession(
            pb.MintSessionRequest(user="u"), metadata=(("x-padding", "p" * 64 * 1024),)
        )
    assert metadata.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,)
    minted = await service.stub.MintSession(pb.MintSessionRequest(user="u"))
    assert minted.user == "u"  # and the server is fine afterwards


async def test_redis_stream_slots_never_go_negative_nor_outlive_their_ttl() -> None:
    from healthagent_service.security.limits import LimitConfig, RedisLimiter

    await require_redis()
    limiter = RedisLimiter(LimitConfig(0, 1, 2), REDIS_URL, f"test-{secrets.token_hex(6)}")
    key = limiter._key("streams", "u")
    client = redis.from_url(REDIS_URL)
    try:
        async with limiter.stream("u"), limiter.stream("u"):
            assert await client.get(key) == b"2"
            assert 0 < await client.ttl(key) <= 3600
            with pytest.raises(Exception, match="already has 2"):
                async with limiter.stream("u"):
                    pass
        assert await client.get(key) is None  # released to zero: no key left behind
        await client.delete(key)
        async with limiter.stream("u"):
            await client.delete(key)  # the counter vanished (expiry, flush) mid-stream
        assert await client.get(key) is None  # the release did not make it -1
    finally:
        await client.aclose()
        await limiter.close()
