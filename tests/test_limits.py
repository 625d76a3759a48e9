"""Per-user limits and input limits, over real sockets (Redis on this machine for shared ones)."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import start_serve
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.calls import collect, status_details
from tests.support.service import ServiceFactory, emulator_env
from tests.support.stores import throwaway_redis

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


async def test_metadata_limit_holds_exactly(service: Any) -> None:
    """Metadata under 16 KiB is always accepted and over it always refused (between gRPC's
    soft and hard limits it used to be refused at random; issue 23, item 9)."""
    under = (("x-padding", "p" * (15 * 1024)),)
    over = (("x-padding", "p" * (16 * 1024 + 512)),)
    codes_under, codes_over = set(), set()
    for _ in range(15):
        try:
            await service.stub.MintSession(pb.MintSessionRequest(user="md"), metadata=under)
            codes_under.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes_under.add(error.code())
        try:
            await service.stub.MintSession(pb.MintSessionRequest(user="md"), metadata=over)
            codes_over.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes_over.add(error.code())
    assert codes_under == {grpc.StatusCode.OK}
    assert codes_over == {grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_redis_stream_slots_are_leases_given_back_to_zero() -> None:
    from healthagent_service.security.limits import LimitConfig, RedisLimiter

    await require_redis()
    limiter = RedisLimiter(
        LimitConfig(0, 1, 2), REDIS_URL, f"test-{secrets.token_hex(6)}", stream_lease_seconds=5
    )
    key = limiter._key("stream-slots", "u")
    client = redis.from_url(REDIS_URL)
    try:
        async with limiter.stream("u"), limiter.stream("u"):
            assert await client.zcard(key) == 2
            assert 0 < await client.pttl(key) <= 5000  # the key ends with its longest lease
            with pytest.raises(Exception, match="already has 2"):
                async with limiter.stream("u"):
                    pass
        await wait_for(lambda: client.exists(key), 0)  # given back: no key left behind
        async with limiter.stream("u"):
            await client.delete(key)  # the slots vanished (expiry, flush) mid-stream
            await limiter.renew_now()  # a renewal does not bring a vanished slot back
            assert await client.exists(key) == 0
        await asyncio.sleep(0.1)
        assert await client.exists(key) == 0
    finally:
        await client.aclose()
        await limiter.close()


async def wait_for(probe: Any, expected: Any, timeout: float = 10.0) -> None:
    """Poll `await probe()` until it returns `expected` (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await probe()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"still {value!r}"
        await asyncio.sleep(0.05)


async def open_streams(stub: Any, user: str, count: int, timeout: float = 10.0) -> None:
    """Open `count` streams for `user` at once, retrying while they are refused
    USER_STREAM_LIMIT, until `timeout`; then end them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        calls = [
            stub.Chat(pb.ChatRequest(message="[chunks=3000]", user=user)) for _ in range(count)
        ]
        try:
            for call in calls:
                async for event in call:
                    if event.WhichOneof("event") == "chunk":
                        break
            return
        except grpc.aio.AioRpcError as error:
            assert status_details(error).reason == "USER_STREAM_LIMIT"
            assert asyncio.get_running_loop().time() < deadline, "slots never came back"
            await asyncio.sleep(0.2)
        finally:
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.1)


async def test_slots_come_back_when_takes_are_cut_off(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    """Callers whose deadline passes while their slot is being taken (Redis slow to answer)
    leave no slot behind: the user can still open their streams (issue 23, item 1)."""
    with throwaway_redis(tmp_path) as own:
        service = await start_service(
            **emulator_env(
                emulator,
                HEALTHAGENT_REDIS_URL=own.url,
                HEALTHAGENT_RATE_LIMIT_PER_MINUTE=0,
                HEALTHAGENT_MAX_STREAMS_PER_USER=2,
                HEALTHAGENT_STREAM_SLOT_LEASE_SECONDS=30,
            )
        )
        admin = redis.from_url(own.url)
        try:
            for _ in range(3):
                # Redis busy for 0.4 s: the takes wait in its sockets and run afterwards
                busy = asyncio.ensure_future(admin.execute_command("DEBUG", "SLEEP", 0.4))  # type: ignore[no-untyped-call]
                await asyncio.sleep(0.05)
                calls = [
                    service.stub.Chat(pb.ChatRequest(message="hi", user="quick"), timeout=0.1)
                    for _ in range(4)
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as cut:
                        await collect(call)
                    assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await busy
                await asyncio.sleep(0.2)  # the takes have landed
            # well within the lease: given back, not expired
            await open_streams(service.stub, "quick", 2, timeout=15)
        finally:
            await admin.aclose()


async def test_redis_outage_fails_closed_and_slots_survive_it(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    """Redis killed mid-stream: the stream that completes ends OK; calls meanwhile are
    UNAVAILABLE with RetryInfo and health says NOT_SERVING; once Redis is back (from its
    append-only file, with the slot whose give-back failed), the slot comes back (items 1, 2)."""
    with throwaway_redis(tmp_path, persist=True) as own:
        service = await start_service(
            **emulator_env(
                emulator,
                HEALTHAGENT_REDIS_URL=own.url,
                HEALTHAGENT_MAX_STREAMS_PER_USER=1,
                HEALTHAGENT_STREAM_SLOT_LEASE_SECONDS=15,
            )
        )
        health: Any = health_pb2_grpc.HealthStub(service.channel)
        stream = service.stub.Chat(pb.ChatRequest(message="[chunks=100] [pace=10]", user="out"))
        events = stream.__aiter__()
        received = [await events.__anext__()]
        own.kill()
        received += [event async for event in events]
        assert received[-1].WhichOneof("event") == "response_done"
        for call in (
            service.stub.MintSession(pb.MintSessionRequest(user="out")),
            collect(service.stub.Chat(pb.ChatRequest(message="hi", user="other"))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            details = status_details(refused.value)
            assert (details.code, details.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "LIMITS_UNAVAILABLE",
            )
            assert details.retry_delay_seconds
        await wait_for(lambda: health_status(health), health_pb2.HealthCheckResponse.NOT_SERVING)
        own.start()
        await wait_for(lambda: health_status(health), health_pb2.HealthCheckResponse.SERVING)
        # the slot's give-back failed while Redis was down; it is given back again at the
        # next renewal (a third of a lease), before the 15 s lease would end it
        await open_streams(service.stub, "out", 1, timeout=11)


async def health_status(health: Any) -> Any:
    answer = await health.Check(health_pb2.HealthCheckRequest(service="healthagent.v1.HealthAgent"))
    return answer.status


async def test_slots_of_a_killed_process_end_with_their_lease(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    """A replica killed while holding a stream slot does not keep it: the lease ends."""
    with throwaway_redis(tmp_path) as own:
        shared = {
            "HEALTHAGENT_REDIS_URL": own.url,
            "HEALTHAGENT_MAX_STREAMS_PER_USER": "1",
            "HEALTHAGENT_STREAM_SLOT_LEASE_SECONDS": "3",
        }
        doomed = start_serve(**shared)
        try:
            with grpc.insecure_channel(doomed.address) as channel:
                stub: Any = pb_grpc.HealthAgentStub(channel)
                held = stub.Chat(pb.ChatRequest(message="[chunks=100000]", user="held"))
                next(held)
                doomed.process.kill()  # SIGKILL: nothing is given back
                doomed.process.wait(10)
        finally:
            doomed.process.kill()
        other = await start_service(**emulator_env(emulator, **shared))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(other.stub.Chat(pb.ChatRequest(message="hi", user="held")))
        assert status_details(refused.value).reason == "USER_STREAM_LIMIT"  # still held
        await open_streams(other.stub, "held", 1, timeout=10)  # the lease ended


async def test_the_session_pool_is_bounded_in_bytes(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    """Each distinct set of state variables is a pooled session of its own: the pool holds at
    most HEALTHAGENT_SESSION_POOL_BYTES of them, not only a number of entries (issue 23, 4)."""
    service = await start_service(
        **emulator_env(
            emulator,
            HEALTHAGENT_RATE_LIMIT_PER_MINUTE=0,
            HEALTHAGENT_SESSION_POOL_BYTES=1024 * 1024,
        )
    )
    for index in range(150):
        request = pb.MintSessionRequest(user="pooler")
        for key in range(4):
            request.state_variables[f"k{key}"].string_value = f"{index}:" + "v" * 3900
        await service.stub.MintSession(request)
    pool = service.running.chatkit.pool
    assert len(pool) <= 1024 * 1024 // (4 * 3900)  # about 16 KiB each: at most 67 fit
    assert pool.stats.evictions >= 150 - len(pool)
    assert pool.bytes <= 1024 * 1024
